"""protocol_merge: runs of the protocol put together keep one row per measurement, refuse runs that
are not comparable or that disagree, and give each model's curve (the mean over its cells)."""

import copy
import json

import pytest

from benchmarks import protocol, protocol_merge


def _row(model, steps, method, kind, psnr, flops):
    return {"model": model, "family": "sd3", "split": "heldout", "sampler": "sd3_cfg", "steps": steps,
            "method": method, "kind": kind, "params": {} if kind != "specdiff" else {"tolerance": 0.1},
            "psnr": psnr, "mean_psnr": sum(psnr) / len(psnr), "worst_psnr": min(psnr),
            "mean_ssim": 1.0, "worst_ssim": 1.0, "flops": flops, "images": len(psnr)}


def _run(rows, commit="a" * 40):
    return {"date": "2026-12-04T00:00:00+00:00", "command": "python benchmarks/protocol.py ...",
            "machine": {"platform": "test", "cpus": 2, "torch_threads": 1, "load_average": [0.0, 0.0, 0.0],
                        "python": "3", "torch": "2", "diffusers": "0"},
            "git": {"commit": commit, "dirty": False}, "prompts": ["a", "b"], "seeds": [0], "steps": [20, 28],
            "images_per_cell": 2, "targets": protocol.TARGETS, "samplers": {},
            "models": [{"name": "m", "family": "sd3", "split": "heldout", "image_size": 32, "image_tokens": 256,
                        "samplers": ["sd3_cfg"]}],
            "methods": [{"label": r["method"], "kind": r["kind"], "params": r["params"]} for r in rows],
            "results": rows, "speed": [], "summary": {}, "wall_seconds": 60.0}


def _eager(steps):
    return _row("m", steps, "eager", "eager", [100.0, 100.0], 1.0)


def test_merge_keeps_one_row_per_measurement_and_draws_the_curve(tmp_path):
    a = _run([_eager(20), _eager(28), _row("m", 20, "specdiff tolerance=0.1", "specdiff", [40.0, 30.0], 0.4),
              _row("m", 28, "specdiff tolerance=0.1", "specdiff", [44.0, 20.0], 0.3)])
    b = _run([_eager(20), _eager(28), _row("m", 20, "mag_cache", "mag_cache", [35.0, 26.0], 0.5),
              _row("m", 28, "mag_cache", "mag_cache", [37.0, 27.0], 0.6)], commit="b" * 40)
    data = protocol_merge.merge([a, b])
    assert [r["method"] for r in data["results"]].count("eager") == 2  # one per cell, not per run
    assert len(data["results"]) == 6 and len(data["runs"]) == 2 and "+" in data["git"]["commit"]
    rows = protocol.curve_rows(data["results"], "m")
    assert [r["method"] for r in rows] == ["specdiff tolerance=0.1", "mag_cache"]  # sorted by FLOPs
    spec = rows[0]
    assert spec["mean_psnr"] == pytest.approx((35.0 + 32.0) / 2) and spec["lowest_cell"] == 32.0
    assert spec["worst_psnr"] == 20.0 and spec["cells_worst_ok"] == 1 and spec["flops"] == pytest.approx(0.35)
    # the command line writes the files, the plot among them
    paths = []
    for i, run in enumerate((a, b)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run))
    out = tmp_path / "merged"
    protocol_merge.main([*map(str, paths), "--write", "--out", str(out)])
    md = (out / "protocol.md").read_text()
    assert "| specdiff tolerance=0.1 | 2 | 33.50 | 32.00 | 20.00 | 1 of 2 | 35.0% (30.0%–40.0%) |" in md
    assert (out / "m.png").stat().st_size > 0 and json.loads((out / "protocol.json").read_text())["runs"]


def test_merge_refuses_runs_that_are_not_comparable_or_disagree():
    a = _run([_eager(20), _row("m", 20, "mag_cache", "mag_cache", [35.0, 26.0], 0.5)])
    other_seeds = copy.deepcopy(a)
    other_seeds["seeds"] = [1]
    with pytest.raises(ValueError, match="other seeds"):
        protocol_merge.merge([a, other_seeds])
    disagree = copy.deepcopy(a)
    disagree["results"][1]["psnr"] = [35.0, 25.0]
    with pytest.raises(ValueError, match="otherwise"):
        protocol_merge.merge([a, disagree])


def test_dominance_names_the_specdiff_setting_above_each_cache():
    def spec(tol, psnr, flops):
        return _row("m", 20, f"specdiff tolerance={tol}", "specdiff", psnr, flops)

    rows = [_eager(20),
            _row("m", 20, "bf16", "bf16", [45.0, 44.0], 1.0),  # a reference, never a cache
            spec(0.2, [33.0, 21.0], 0.30), spec(0.1, [40.0, 30.0], 0.45),
            _row("m", 20, "mag_cache a", "mag_cache", [34.0, 28.0], 0.50),  # above on the mean: 0.1 (35 > 31)
            _row("m", 20, "mag_cache b", "mag_cache", [30.0, 20.0], 0.40),  # only 0.2 is cheaper: 27 > 25, 21 >= 20
            _row("m", 20, "faster_cache", "faster_cache", [34.0, 34.0], 0.60),  # mean under 0.1's, worst not
            _row("m", 20, "pab", "pyramid_attention_broadcast", [33.0, 32.0], 0.25)]  # nothing as cheap
    dom = {d["method"]: d for d in protocol.dominance_rows(rows, "m")}
    assert list(dom) == ["pab", "mag_cache b", "mag_cache a", "faster_cache"]  # by FLOPs; no bf16, no specdiff
    assert dom["pab"]["above_mean"] is None and dom["pab"]["above_both"] is None
    assert dom["mag_cache b"]["above_both"]["method"] == "specdiff tolerance=0.2"
    assert dom["mag_cache a"]["above_both"]["method"] == "specdiff tolerance=0.1"
    assert dom["faster_cache"]["above_mean"]["method"] == "specdiff tolerance=0.1"
    assert dom["faster_cache"]["above_both"] is None  # 30 < 34 on the worst image
    # a setting measured on other cells is not compared
    other = _row("m", 28, "specdiff tolerance=0.05", "specdiff", [60.0, 60.0], 0.1)
    assert protocol.dominance_rows(rows + [other], "m")[0]["above_mean"] is None
    md = protocol_merge.curve_markdown({"models": [{"name": "m"}], "results": rows})
    assert "| faster_cache | 34.00 | 34.00 | 60.0% | specdiff tolerance=0.1 (35.00 / 30.00 dB, 45.0%) | **none** |" in md
    assert "3 of 4 on the mean, 2 of 4 on the mean and the worst image" in md
