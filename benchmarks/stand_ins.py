"""What a token that is not computed should get: its last output, its residual, or a linear
extrapolation? Measured on full-compute generations, no caching involved.

    python benchmarks/stand_ins.py                 # tune models, 28 steps, 4 prompts (about a minute)
    python benchmarks/stand_ins.py --model sd3 --sampler sd3_cfg --steps 50
    python benchmarks/stand_ins.py --guided        # the guided velocity under CFG (measure_guided)

For each call ``t`` of a full-compute generation (the protocol's samplers) and a lag ``l``
(in steps), the relative error ``||approx - out_t|| / ||out_t||`` of the per-token output
``out_t`` (``proj_out``'s, before unpatchify) when every token is approximated from the call
``l`` steps earlier:

* output reuse (what specdiff's reuse tier does): ``out_{t-l}``;
* residual reuse (what MagCache / TeaCache reuse, per token here): the transformer blocks'
  residual ``h_end - h_start`` of call ``t-l`` added to call ``t``'s own stream start, then
  the model's own ``norm_out`` (with call ``t``'s conditioning) and ``proj_out``;
* linear extrapolation in sigma from the calls ``t-l`` and ``t-l-1`` (a first-order
  TaylorSeer-style forecast);
* x0 reuse: the image the call ``t-l`` predicted, ``x0 = x - sigma * v`` per token (``x`` the
  call's latent in the output's token layout), held fixed and turned back into a velocity at
  call ``t``'s latent and sigma, ``(x_t - x0) / sigma_t``: what a DDIM-style step from a reused
  prediction does;
* noise reuse: the same with the noise the call predicted, ``eps = x + (1 - sigma) * v``, held
  fixed: ``(eps - x_t) / (1 - sigma_t)``;
* hidden reuse: the last block's output ``h_end`` of call ``t-l`` through the model's own
  ``norm_out`` with call ``t``'s conditioning and ``proj_out``: reuse with the output layer's
  modulation brought up to date (what caching the hidden state instead of the output would give).

On a rectified-flow model sampled by Euler without guidance, x0 and noise reuse at lag 1 equal
output reuse exactly (the step moved the latent along the reused velocity); they differ under
guidance, where the latent moved along the guided combination of the branches, and over longer lags.
The longer lags here overstate what they could change in a cached run: there, without guidance,
the skipped calls move the latent along the reused velocity itself, so x0 and noise reuse give
that velocity back at every lag (they differ only where a sparse call's fresh tokens or a
correction moved the latent otherwise).

Printed as the mean over the first, middle and last third of the calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def token_latent(model, hidden_states: torch.Tensor) -> torch.Tensor:
    """The transformer's input latent in its output's per-token layout (``proj_out``'s, before
    unpatchify): FLUX's packed tokens as they are; SD3's ``[B, C, H, W]`` cut into ``p x p``
    patches ordered ``(p, q, c)`` as SD3's unpatchify reads them."""
    if hidden_states.dim() == 3:
        return hidden_states
    b, c, h, w = hidden_states.shape
    p = model.transformer.config.patch_size
    x = hidden_states.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def capture(name: str, sampler_name: str, steps: int, prompts: int):
    """``(model, calls, sigmas)`` of a full-compute generation of ``sampler_name``: per
    transformer call, its sigma and a dict of its latent ``x`` (output layout), stream start
    and end, output-layer conditioning and output ``out``."""
    from benchmarks import protocol
    from specdiff_zoo import load_shapes_dit

    model = load_shapes_dit(name)
    tr = model.transformer
    start = tr.pos_embed if model.family == "sd3" else tr.x_embedder
    calls, sigmas, cur = [], [], {}
    per_sigma = 1000.0 if model.family == "sd3" else 1.0  # SD3 is called with sigma * 1000, FLUX with sigma

    def before(module, args, kwargs) -> None:
        sigmas.append(float(kwargs["timestep"].flatten()[0]) / per_sigma)
        cur["x"] = token_latent(model, kwargs["hidden_states"]).detach().clone()
    hooks = [
        tr.register_forward_pre_hook(before, with_kwargs=True),
        start.register_forward_hook(lambda m, a, o: cur.__setitem__("start", o.detach().clone())),
        tr.norm_out.register_forward_hook(
            lambda m, a, o: cur.update(end=a[0].detach().clone(), cond=a[1].detach().clone())),
        tr.proj_out.register_forward_hook(lambda m, a, o: calls.append({**cur, "out": o.detach().clone()})),
    ]
    noise = protocol.initial_noise(0, model.image_size, prompts)
    try:
        with torch.no_grad():
            protocol.SAMPLERS[sampler_name](model, tr, protocol.PROMPTS[:prompts], noise, steps)
    finally:
        for h in hooks:
            h.remove()
    return model, calls, sigmas


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _row(name: str, sampler_name: str, steps: int, lag: int, errs: dict[str, list[float]]) -> str:
    """One table row: each column's mean over the first, middle and last third of the calls."""
    n = len(next(iter(errs.values())))
    thirds = [slice(0, n // 3), slice(n // 3, 2 * n // 3), slice(2 * n // 3, n)]
    cells = [" / ".join(f"{sum(e[s]) / max(1, len(e[s])):.3f}" for s in thirds) for e in errs.values()]
    return f"| {name} | {sampler_name} | {steps} | {lag} | " + " | ".join(cells) + " |"


def measure(name: str, sampler_name: str, steps: int, prompts: int, lags=(1, 2, 3, 5)) -> list[str]:
    from benchmarks import protocol

    model, calls, sigmas = capture(name, sampler_name, steps, prompts)
    tr = model.transformer
    with torch.no_grad():
        per = protocol.CALLS_PER_STEP[sampler_name]

        lines = []
        for lag in lags:
            errs: dict[str, list[float]] = {"output reuse": [], "residual reuse": [], "extrapolation": [],
                                            "x0 reuse": [], "noise reuse": [], "hidden reuse": []}
            for t in range((lag + 1) * per, len(calls)):
                a, a2, b = calls[t - lag * per], calls[t - (lag + 1) * per], calls[t]
                errs["output reuse"].append(_rel(a["out"], b["out"]))
                h = b["start"] + (a["end"] - a["start"])
                errs["residual reuse"].append(_rel(tr.proj_out(tr.norm_out(h, b["cond"])), b["out"]))
                sa, sa2, sb = sigmas[t - lag * per], sigmas[t - (lag + 1) * per], sigmas[t]
                w = (sb - sa) / (sa - sa2)
                errs["extrapolation"].append(_rel(a["out"] + w * (a["out"] - a2["out"]), b["out"]))
                x0 = a["x"] - sa * a["out"]
                eps = a["x"] + (1 - sa) * a["out"]
                errs["x0 reuse"].append(_rel((b["x"] - x0) / sb, b["out"]))
                errs["noise reuse"].append(_rel((eps - b["x"]) / (1 - sb), b["out"]))
                errs["hidden reuse"].append(_rel(tr.proj_out(tr.norm_out(a["end"], b["cond"])), b["out"]))
            lines.append(_row(name, sampler_name, steps, lag, errs))
        return lines


GUIDED_COLUMNS = ("reuse", "extrapolation", "half extrapolation", "extrapolation of the branches' mean")


def measure_guided(name: str, sampler_name: str, steps: int, prompts: int, lags=(1, 2, 3)) -> list[str]:
    """Under guidance: the relative error of the *guided* velocity ``g = u + s (c - u)`` (what
    moves the latent) when the branches' outputs ``c``, ``u`` of the step ``l`` steps earlier
    stand in: both reused; both extrapolated in sigma from that step and the one before it
    (``g1 + w (g1 - g2)``, what ``reuse_extrapolation=1`` would give each branch); half that
    step; and only the branches' mean extrapolated (``g1 + w (m1 - m2)``, ``m = (c + u) / 2``:
    the difference the guidance scale multiplies kept as reused)."""
    from benchmarks import protocol

    model, calls, sigmas = capture(name, sampler_name, steps, prompts)
    per = protocol.CALLS_PER_STEP[sampler_name]
    outs = [c["out"] for c in calls]
    # per step: (sigma, cond, uncond), the sampler's call order (protocol.guide)
    steps_cu = [(sigmas[t], *reversed(outs[t].chunk(2))) if per == 1 else (sigmas[t], outs[t], outs[t + 1])
                for t in range(0, len(outs), per)]
    lines = []
    for lag in lags:
        errs: dict[str, list[float]] = {k: [] for k in GUIDED_COLUMNS}
        for t in range(lag + 1, len(steps_cu)):
            (sa, c1, u1), (sa2, c2, u2), (sb, c, u) = steps_cu[t - lag], steps_cu[t - lag - 1], steps_cu[t]
            g = [protocol.guide(sampler_name, model, [torch.cat([uu, cc])] if per == 1 else [cc, uu])
                 for cc, uu in ((c1, u1), (c2, u2), (c, u))]
            w = (sb - sa) / (sa - sa2)
            errs["reuse"].append(_rel(g[0], g[2]))
            errs["extrapolation"].append(_rel(g[0] + w * (g[0] - g[1]), g[2]))
            errs["half extrapolation"].append(_rel(g[0] + 0.5 * w * (g[0] - g[1]), g[2]))
            errs["extrapolation of the branches' mean"].append(_rel(g[0] + w * ((c1 + u1) - (c2 + u2)) / 2, g[2]))
        lines.append(_row(name, sampler_name, steps, lag, errs))
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a zoo model (default: the tune models with their samplers)")
    p.add_argument("--sampler", default=None)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--guided", action="store_true", help="the guided velocity's error under CFG (sd3_cfg, "
                   "flux_truecfg) instead: reused or extrapolated branches (measure_guided)")
    a = p.parse_args(argv)
    if a.guided:
        cells = [(a.model, a.sampler or ("sd3_cfg" if a.model.startswith("sd3") else "flux_truecfg"))] if a.model \
            else [("sd3", "sd3_cfg"), ("flux", "flux_truecfg")]
        print("| model | sampler | steps | lag | " + " | ".join(GUIDED_COLUMNS) + " |")
        print("|---|---|---|---|" + "---|" * len(GUIDED_COLUMNS))
        for name, sampler in cells:
            print("\n".join(measure_guided(name, sampler, a.steps, a.prompts)), flush=True)
        return
    cells = [(a.model, a.sampler or ("sd3_cfg" if a.model.startswith("sd3") else "flux_nocfg"))] if a.model else \
        [("sd3", "sd3_cfg"), ("flux", "flux_nocfg"), ("flux", "flux_truecfg")]
    print("| model | sampler | steps | lag | output reuse | residual reuse | extrapolation | x0 reuse | noise reuse | hidden reuse |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, sampler in cells:
        print("\n".join(measure(name, sampler, a.steps, a.prompts)), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
