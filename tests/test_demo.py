"""A short smoke run of the demo code path (few steps, plain FX) so it cannot rot."""


import specdiff_fx
from specdiff_zoo import demo


def test_demo_smoke(tmp_path, capsys):
    out = tmp_path / "demo.png"
    result = demo.run("sd3", steps=8, repeats=1, out=str(out), prompts=demo.PROMPTS[:2], inductor=False)
    text = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 0
    for needle in ("s / image", "vs eager", "PSNR", "FLOPs executed", "first run includes compile time"):
        assert needle in text
    assert 0 < result["flops_fraction"] < 1.5 and result["fidelity"]["psnr"] > 10
    rep = specdiff_fx.last_generation()
    assert rep.count("cached") > 0 and rep.computed_counts.shape == (4, 256)  # CFG batch 2 x 2 prompts
    from PIL import Image

    assert Image.open(out).size == (4 * 32 * 4, 2 * 32 * 4)  # 4 panels per prompt, x4 upscale
