"""What ``pip install`` ships: the library, not the example models, their data or the demo."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_library_only(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:  # pyproject's build requirement (SPDX license)
        pytest.skip(f"setuptools {setuptools.__version__} cannot build this project without isolation")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("specdiff_fx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert "specdiff_fx" in top and not any(t.startswith("specdiff_zoo") for t in top), top
    assert not [n for n in names if n.endswith((".safetensors", ".csv", ".png"))]
    assert sum(zipfile.ZipFile(wheel).getinfo(n).file_size for n in names) < 1_000_000
    assert "specdiff_fx/passes/analyze_dit.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "specdiff = specdiff_fx.dynamo_backend:specdiff_backend" in zipfile.ZipFile(wheel).read(entry).decode()
