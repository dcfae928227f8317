"""CI smoke test: the stand-in comparison runs on both families, and its x0 / noise reuse follow
the latent: without guidance, at lag 1, an Euler step moved the latent along the reused
velocity, so both equal output reuse (a wrong token layout or sigma scale breaks that)."""

import torch

from benchmarks import stand_ins


def _cells(line: str) -> list[list[float]]:
    cells = [c.strip() for c in line.strip().strip("|").split("|")][4:]
    return [[float(x) for x in c.split(" / ")] for c in cells]


def test_x0_and_noise_reuse_equal_output_reuse_without_guidance_at_lag_1():
    (line,) = stand_ins.measure("flux", "flux_nocfg", steps=6, prompts=1, lags=(1,))
    out, residual, extrap, x0, noise, hidden = _cells(line)
    assert all(0 < e < 1 for e in out + residual + extrap + hidden)
    assert x0 == out and noise == out


def test_sd3_patch_layout_and_guidance():
    (line,) = stand_ins.measure("sd3", "sd3_cfg", steps=6, prompts=1, lags=(1,))
    out, _, _, x0, noise, _ = _cells(line)
    # under batched CFG the latent moved along the guided velocity, not the branch's own: they differ
    assert x0 != out and noise != out
    assert all(0 < e < 2 for e in out) and all(0 < e < float("inf") for e in x0 + noise)


def test_token_latent_inverts_sd3_unpatchify():
    from specdiff_zoo import load_shapes_dit

    model = load_shapes_dit("sd3")
    p = model.transformer.config.patch_size
    x = torch.randn(2, model.transformer.config.in_channels, 4 * p, 4 * p)
    tokens = stand_ins.token_latent(model, x)
    # SD3's own unpatchify: [B, h, w, p, p, C] -> [B, C, h * p, w * p]
    b, n, _ = tokens.shape
    back = tokens.reshape(b, 4, 4, p, p, -1).permute(0, 5, 1, 3, 2, 4).reshape(x.shape)
    assert torch.equal(back, x)


def test_guided_velocity_stand_ins_under_both_cfg_forms():
    """``--guided``: the guided velocity's error per stand-in, for batched CFG (SD3: ``[uncond;
    cond]`` halves) and true CFG (FLUX: cond, then uncond calls); extrapolating nothing of a step
    that moved by 0 would be reuse, so the columns differ where the outputs moved."""
    for name, sampler in (("sd3", "sd3_cfg"), ("flux", "flux_truecfg")):
        (line,) = stand_ins.measure_guided(name, sampler, steps=6, prompts=1, lags=(1,))
        reuse, extrap, half, mean = _cells(line)
        assert all(0 < e < 10 for e in reuse + extrap + half + mean)
        assert extrap != reuse and half != reuse and mean != reuse
