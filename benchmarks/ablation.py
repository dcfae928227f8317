"""Fidelity ablation on the shipped trained models: what each choice of the method is worth.

Two tables, both load-independent (PSNR of the final images against full compute, FLOPs
counted), 28 Euler steps, the sweep's 4 prompts:

1. *Token choice with exact compute* (eager, no backend): on each cached step every token is
   computed, then only ``k`` of them are kept fresh and the rest reuse their last fresh output.
   This isolates *which* tokens to recompute from the errors of sparse compute (stale K/V).
2. *The backend* (rewritten graphs run as plain FX, so it takes minutes, not an hour): the
   options one at a time, against the defaults, on the SD3 and the FLUX shapes models.

3. ``--robustness``: a few settings on 8 prompts x 2 seeds (about 35 minutes), to see how far
   PSNR moves with the images: neighbouring settings differ by 1-2 dB on 4 prompts.

    python benchmarks/ablation.py              # tables 1 and 2 (about 15 minutes on 2 CPU cores)
    python benchmarks/ablation.py --robustness # table 3
    python benchmarks/ablation.py --tiny       # CI smoke mode: 1 prompt, 6 steps, 2 rows
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import specdiff_fx  # noqa: E402
from benchmarks.sweep import PAPER, PROMPTS  # noqa: E402
from specdiff_fx import SpecDiffConfig, metrics  # noqa: E402
from specdiff_fx.control import Action, Decision, Observation, Policy, StepView, make_policy  # noqa: E402
from specdiff_zoo import load_shapes_dit, pack_pixels, unpack_pixels  # noqa: E402

#: (label, options) of table 2; the defaults first
BACKEND_ROWS: list[tuple[str, dict]] = [
    ("defaults", {}),
    ("as published: attention score, three tiers, K/V reused", PAPER),
    ("attention score (rest default)", {"score": "attention"}),
    ("K/V reused, not extrapolated", {"kv_extrapolation": False}),
    ("C3 blend on (paper weights)", {"blend": True}),
    ("C3 blend on (taylor)", {"blend": True, "blend_mode": "taylor"}),
    ("no speculation (speculative_steps=0)", {"speculative_steps": 0}),
    ("speculative_steps=3", {"speculative_steps": 3}),
    ("context cached (context_ratio=1)", {"context_ratio": 1.0}),
    ("context computed (context_ratio=0)", {"context_ratio": 0.0}),
    ("half the context computed (context_ratio=0.5)", {"context_ratio": 0.5}),
    ("warmup_steps=3", {"controller": "fixed", "warmup_steps": 3}),
    ("refresh_at=(0.8,)", {"controller": "fixed", "refresh_at": (0.8,)}),
    ("refresh_at=(0.8,), no speculation", {"controller": "fixed", "refresh_at": (0.8,), "speculative_steps": 0}),
    ("refresh_at=()", {"controller": "fixed", "refresh_at": ()}),
    ("refresh_at=(0.4, 0.65, 0.85)", {"controller": "fixed", "refresh_at": (0.4, 0.65, 0.85)}),
    ("cache_ratio=0.95", {"cache_ratio": 0.95}),
]


#: table 3: the sweep's prompts and four more, two seeds
MORE_PROMPTS = [
    "a orange square at the bottom on a black background",  # the zoo's vocabulary has no "an"
    "a blue triangle at the right on a white background",
    "a red square at the top on a gray background",
    "a green circle at the bottom on a navy background",
]
ROBUSTNESS_ROWS: list[dict] = [
    {}, {"speculative_steps": 0},
    *({"controller": "fixed", **row} for row in (
        {"speculative_steps": 0, "refresh_at": (0.3,)}, {"speculative_steps": 0, "refresh_at": (0.2, 0.5)},
        {"refresh_at": (0.3,)}, {"refresh_at": (0.25, 0.6)}, {"refresh_at": (0.5, 0.75)}, {"refresh_at": (0.55, 0.8)},
        {"refresh_at": (0.4, 0.7)}, {"refresh_at": (0.45, 0.8)})),
]


class ExactSelection(torch.nn.Module):
    """Calls the model in full every step; on cached steps keeps only ``k`` tokens fresh per
    image (the CFG halves of one image share them) and reuses the others' last fresh output."""

    def __init__(self, model: torch.nn.Module, k: int, rule: str, policy: Policy) -> None:
        super().__init__()
        self.model, self.k, self.rule = model, k, rule
        self.policy, self.state, self.sigmas = policy, policy.start(), []  # which steps are full: the backend's own
        self.step = 0
        self.gen = torch.Generator().manual_seed(0)

    def _full(self, i: int, sigma: float) -> bool:
        view = StepView(step=i, sigma=sigma, sigmas=tuple(self.sigmas), num_tokens=0)
        decision = Decision.full() if i == 0 else self.policy.decide(self.state, view)
        self.policy.observe(self.state, view, Observation(decision, sigma, 0, 0))
        self.sigmas.append(sigma)
        return decision.action is Action.FULL

    def forward(self, **kw):
        sigma = float(kw["timestep"].reshape(-1)[0]) / 1000.0
        v = self.model(**kw)[0]
        out = pack_pixels(v)  # [B, N, 4C]: one token per 2x2 patch, as the SD3 model's tokens
        b, n, _ = out.shape
        i, self.step = self.step, self.step + 1
        if self._full(i, sigma):
            if i == 0:
                self.f1, self.f2 = out.clone(), out.clone()
                self.s1, self.s2 = torch.full((b, n), sigma), torch.full((b, n), sigma)
                self.age = torch.zeros(b, n)
            else:
                self.f2, self.s2, self.f1, self.s1 = self.f1, self.s1, out.clone(), torch.full((b, n), sigma)
                self.age.zero_()
            return (v,)
        if self.rule == "oracle":  # the tokens whose reused output is furthest from the fresh one
            score = (out - self.f1).norm(dim=-1)
        elif self.rule == "drift":
            gap = (self.s2 - self.s1).clamp_min(1e-9)
            score = (self.f1 - self.f2).norm(dim=-1) / gap * (self.s1 - sigma)
        elif self.rule == "round-robin":
            score = self.age + 1e-3 * torch.rand(b, n, generator=self.gen)
        else:
            score = torch.rand(b, n, generator=self.gen)
        half = b // 2  # batched CFG: uncond half, cond half of the same images
        score = (score[:half] + score[half:]).repeat(2, 1)
        keep = torch.zeros(b, n, dtype=torch.bool).scatter_(1, score.topk(self.k, dim=1).indices, True)
        self.age = torch.where(keep, 0.0, self.age + 1)
        self.f2 = torch.where(keep[..., None], self.f1, self.f2)
        self.s2 = torch.where(keep, self.s1, self.s2)
        self.f1 = torch.where(keep[..., None], out, self.f1)
        self.s1 = torch.where(keep, torch.full_like(self.s1, sigma), self.s1)
        return (unpack_pixels(self.f1, v.shape[2], v.shape[3]),)


def exact_selection_table(prompts: list[str], steps: int, ks: tuple[int, ...]) -> str:
    model = load_shapes_dit("sd3")
    n = (model.transformer.config.sample_size // model.transformer.config.patch_size) ** 2
    # full steps where the fixed schedule puts them (it only needs the sigmas)
    policy = lambda: make_policy(SpecDiffConfig(controller="fixed"), n)  # noqa: E731
    with torch.no_grad():
        ref = model.sample(prompts, num_steps=steps, seed=0)
        lines = ["| k of %d tokens fresh per cached step | random | round-robin | drift | oracle |" % n,
                 "|---|---|---|---|---|"]
        for k in ks:
            cells = []
            for rule in ("random", "round-robin", "drift", "oracle"):
                out = model.sample(prompts, num_steps=steps, seed=0,
                                   transformer=ExactSelection(model.transformer, k, rule, policy()))
                cells.append(f"{metrics.psnr(out, ref):.2f}")
            lines.append(f"| {k} (cache_ratio {1 - k / n:.2f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _generate(model, options: dict, prompts: list[str], steps: int, seed: int):
    """One generation with a freshly compiled specdiff transformer (plain-FX path): (images, report)."""
    torch._dynamo.reset()
    comp = torch.compile(model.transformer, backend="specdiff", options={**options, "inductor": False})
    out = model.sample(prompts, num_steps=steps, seed=seed, transformer=comp)
    return out, specdiff_fx.last_generation()


def backend_table(family: str, prompts: list[str], steps: int, rows: list[tuple[str, dict]]) -> str:
    model = load_shapes_dit(family)
    lines = [f"| {family}: options (rest default) | PSNR (dB) | SSIM | FLOPs executed | context |",
             "|---|---|---|---|---|"]
    with torch.no_grad():
        ref = model.sample(prompts, num_steps=steps, seed=0)
        for label, options in rows:
            out, rep = _generate(model, options, prompts, steps, seed=0)
            ctx = rep.context
            lines.append(f"| {label} | {metrics.psnr(out, ref):.2f} | {metrics.ssim(out, ref):.4f} | "
                         f"{rep.flops_fraction:.1%} | {ctx} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def robustness_table(family: str, prompts: list[str], steps: int, seeds: tuple[int, ...],
                     rows: list[dict]) -> str:
    """PSNR per seed (over all ``prompts``) and their mean, per option set."""
    model = load_shapes_dit(family)
    lines = [f"| model | options (rest default) | {' | '.join(f'seed {s}' for s in seeds)} | mean | FLOPs |",
             "|---|---|" + "---|" * (len(seeds) + 2)]
    with torch.no_grad():
        refs = {s: model.sample(prompts, num_steps=steps, seed=s) for s in seeds}
        for options in rows:
            psnrs, fraction = [], 0.0
            for s in seeds:
                out, rep = _generate(model, options, prompts, steps, seed=s)
                psnrs.append(metrics.psnr(out, refs[s]))
                fraction = rep.flops_fraction
            label = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"
            cells = " | ".join(f"{p:.2f}" for p in psnrs)
            lines.append(f"| {family} | {label} | {cells} | {sum(psnrs) / len(psnrs):.2f} | {fraction:.1%} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CI smoke mode")
    p.add_argument("--robustness", action="store_true", help="table 3 only: 8 prompts x 2 seeds")
    p.add_argument("--seeds", default="0,1", help="table 3's seeds, comma-separated (default 0,1)")
    a = p.parse_args(argv)
    if a.robustness:
        seeds = tuple(int(x) for x in a.seeds.split(","))
        prompts, steps, seeds = (PROMPTS[:1], 6, seeds[:1]) if a.tiny else ([*PROMPTS, *MORE_PROMPTS], 28, seeds)
        for family in ("sd3",) if a.tiny else ("sd3", "flux"):
            print(robustness_table(family, prompts, steps, seeds, ROBUSTNESS_ROWS[:1] if a.tiny else ROBUSTNESS_ROWS),
                  flush=True)
        return
    prompts, steps = (PROMPTS[:1], 6) if a.tiny else (PROMPTS, 28)
    print(exact_selection_table(prompts, steps, (3,) if a.tiny else (26, 64, 128)), flush=True)
    for family in ("sd3",) if a.tiny else ("sd3", "flux"):
        print(backend_table(family, prompts, steps, BACKEND_ROWS[:2] if a.tiny else BACKEND_ROWS), flush=True)


if __name__ == "__main__":
    main()
