"""The ceiling of a step-level schedule driven by the error of reuse: an oracle controller.

    python benchmarks/oracle_schedule.py --tolerances 0.06,0.08,0.1      # tune models, 9 cells, 2 seeds
    python benchmarks/oracle_schedule.py --tolerances 0.08 --no-hindsight
    python benchmarks/oracle_schedule.py --tolerances 0.12 --criterion max
    python benchmarks/oracle_schedule.py --tolerances 0.06,0.08,0.1 --sigma-weight 0.5 --weight-cap 2

No specdiff runtime is involved. Every call of the protocol's samplers runs the untouched
transformer; the oracle then returns either that output (a *full* call) or the output of the
branch's last full call (a *skipped* call: every token reused, as the defaults' skipped calls
reuse them). The call is full when the *true* relative error of reusing,
``||F - F_last|| / ||F||`` over the batch (``--criterion max``: the largest sample's), exceeds
the tolerance; the first call and the final jump (the rule of
:meth:`specdiff_fx.control.error.ErrorControlled.final_jump`: nothing after it corrects its error)
are always full. Under true CFG the calls of a step are decided together, after its last one,
as the library's controller decides them: their errors pool (the root mean square of the calls'
relative errors, as :class:`specdiff_fx.control.error.StepErrors` pools them; ``--criterion
max``: the largest), and the outputs of the step's earlier calls, returned before the decision,
are overwritten in place with what the decision gives them (the samplers combine a step's
outputs only after its last call, as ``FluxPipeline`` does). Before 2026-12-04 the step's first
call decided alone, on its own error: a weaker oracle under true CFG (BENCHMARKS.md). With hindsight (the default, as in the
library) each full call returns its output plus :class:`specdiff_fx.runtime.hindsight.Hindsight`'s
correction of the skipped calls before it.

``--sigma-weight G`` holds the call at sigma to ``tolerance * w(sigma)``, ``w = ((1 - sigma) /
sigma) ** G`` capped at ``--weight-cap``: ``G > 0`` is stricter at high noise (where the
composition forms) and looser near the end, ``G < 0`` the other way, ``0`` (the default) the
library's flat tolerance.

What it bounds: a controller that knew every call's error of reuse exactly, with no sparse call to
pay for measuring it and no guard but the final jump. Its images against full compute (PSNR mean
and worst over the prompts and seeds of a cell) and its share of full calls (its FLOPs: a
skipped call costs none here) place the error-controlled defaults on the same axes: where they
lie close to the oracle's curve, estimating the error better cannot buy much, and what is left
is the approximation itself (what a skipped call returns).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]


class ReuseState:
    """Per branch of a generation: the last full output, the sigmas called so far and the
    hindsight correction; what a call returns once it is known to be full or skipped. Shared by
    this oracle and ``schedule_search.py``, so the two return the same as each other and as the
    library's full and skipped calls."""

    def __init__(self, branches: int, hindsight: bool = True) -> None:
        from specdiff_fx.runtime.hindsight import Hindsight

        self.hindsight = hindsight
        self.last: list[torch.Tensor | None] = [None] * branches
        self.sigmas: list[list[float]] = [[] for _ in range(branches)]
        self.corrections = [Hindsight() for _ in range(branches)]

    def settle(self, b: int, sigma: float, true: torch.Tensor | None, full: bool) -> torch.Tensor:
        """Branch ``b``'s output for its call at ``sigma``: full, ``true`` (the untouched
        transformer's output) plus the correction of the skipped calls before it; skipped, the
        branch's last full output (``true`` is not read)."""
        sigmas = self.sigmas[b]
        if full:
            out = self.corrections[b].full(sigma, true, list(sigmas)) if self.hindsight else true
            self.last[b] = true
        else:
            out = self.last[b]
            if self.hindsight:
                self.corrections[b].cached(sigma, out)
        sigmas.append(sigma)
        return out


class OracleCaller:
    """A callable standing in for the transformer in a protocol sampler (see module docstring)."""

    def __init__(self, transformer: Any, timestep_per_sigma: float, branches: int, tolerance: float,
                 hindsight: bool = True, criterion: str = "batch", sigma_weight: float = 0.0,
                 weight_cap: float = 4.0) -> None:
        if criterion not in ("batch", "max"):
            raise ValueError(f"criterion must be 'batch' or 'max', got {criterion!r}")
        self.transformer, self.branches, self.tolerance = transformer, branches, tolerance
        self.timestep_per_sigma = timestep_per_sigma  # the family's (specdiff_fx.families)
        self.criterion = criterion
        self.sigma_weight, self.weight_cap = sigma_weight, weight_cap
        self.state = ReuseState(branches, hindsight)
        self.calls = 0
        self.kinds: list[str] = []  # per step: "f" or "s"
        self._step: list[tuple[int, float, torch.Tensor]] = []  # the step's calls so far: branch, sigma, output
        self._returned: list[torch.Tensor] = []  # what the step's earlier calls returned, to overwrite

    def error(self, true: torch.Tensor, reused: torch.Tensor) -> float:
        if self.criterion == "max":
            per = (true - reused).flatten(1).norm(dim=1) / true.flatten(1).norm(dim=1).clamp_min(1e-12)
            return float(per.max())
        return float((true - reused).norm() / true.norm().clamp_min(1e-12))

    def threshold(self, sigma: float) -> float:
        """The error a call at ``sigma`` may reuse with: ``tolerance * w(sigma)`` (module docstring)."""
        if self.sigma_weight == 0:
            return self.tolerance
        s = min(max(sigma, 1e-3), 1 - 1e-3)
        return self.tolerance * min(self.weight_cap, ((1 - s) / s) ** self.sigma_weight)

    def pooled(self, errors: list[float]) -> float:
        """The step's error from its calls' (one per branch)."""
        if self.criterion == "max":
            return max(errors)
        return (sum(e * e for e in errors) / len(errors)) ** 0.5

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        from specdiff_fx.control.base import StepView
        from specdiff_fx.control.error import ErrorControlled

        b = self.calls % self.branches
        self.calls += 1
        sigma = float(kwargs["timestep"].max()) / self.timestep_per_sigma
        true = self.transformer(*args, **kwargs)[0]
        self._step.append((b, sigma, true))
        if b < self.branches - 1:  # decided with the step's last call; overwritten then
            self._returned.append(true.clone())
            return (self._returned[-1],)
        calls, returned, self._step, self._returned = self._step, self._returned, [], []
        last = self.state.last
        sigmas = self.state.sigmas[calls[0][0]]
        full = any(last[c] is None for c, _, _ in calls) or self.pooled(
            [self.error(t, last[c]) for c, _, t in calls]) > self.threshold(calls[0][1])
        view = StepView(step=len(sigmas), sigma=calls[0][1], sigmas=tuple(sigmas), num_tokens=0)
        full = full or ErrorControlled.final_jump(view)
        self.kinds.append("f" if full else "s")
        outs = [self.state.settle(c, s, t, full) for c, s, t in calls]
        for buf, out in zip(returned, outs):
            buf.copy_(out)
        return (outs[-1],)

    @property
    def full_fraction(self) -> float:
        return self.kinds.count("f") / max(1, len(self.kinds))


def cell(model: Any, sampler: str, steps: int, seeds: Sequence[int], tolerances: Sequence[float],
         hindsight: bool = True, criterion: str = "batch", prompts: int = 8, sigma_weight: float = 0.0,
         weight_cap: float = 4.0) -> list[dict]:
    """One (model, sampler, steps) cell at each tolerance: per-image PSNR against full compute
    (one reference generation per seed, shared by the tolerances) and the share of full calls."""
    from benchmarks import protocol
    from specdiff_fx.families import FAMILIES

    timestep_per_sigma = next(f.timestep_per_sigma for f in FAMILIES if f.name == model.family)
    branches = protocol.CALLS_PER_STEP[sampler]
    psnr: list[list[float]] = [[] for _ in tolerances]
    fractions: list[list[float]] = [[] for _ in tolerances]
    kinds: list[list[str]] = [[] for _ in tolerances]
    texts = protocol.PROMPTS[:prompts]
    with torch.no_grad():
        for seed in seeds:
            noise = protocol.initial_noise(seed, protocol.image_size(model), prompts)
            ref = protocol.SAMPLERS[sampler](model, model.transformer, texts, noise, steps)
            for i, tol in enumerate(tolerances):
                caller = OracleCaller(model.transformer, timestep_per_sigma, branches, tol, hindsight, criterion,
                                      sigma_weight, weight_cap)
                images = protocol.SAMPLERS[sampler](model, caller, texts, noise, steps)
                psnr[i] += protocol._per_image(images, ref)[0]
                fractions[i].append(caller.full_fraction)
                kinds[i].append("".join(caller.kinds))
    return [{"tolerance": tol, "sampler": sampler, "steps": steps, "mean_psnr": sum(ps) / len(ps),
             "worst_psnr": min(ps), "full_fraction": sum(fr) / len(fr), "kinds": kd}
            for tol, ps, fr, kd in zip(tolerances, psnr, fractions, kinds)]


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd3,flux", help="comma-separated zoo models (default: the tune models)")
    p.add_argument("--steps", default="20,28,50")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--tolerances", default="0.08")
    p.add_argument("--no-hindsight", action="store_true", help="full calls return their output uncorrected")
    p.add_argument("--criterion", default="batch", choices=("batch", "max"),
                   help="the batch's relative error of reuse, or the largest sample's")
    p.add_argument("--sigma-weight", type=float, default=0.0, metavar="G",
                   help="the tolerance at sigma times ((1 - sigma) / sigma) ** G (default 0: flat)")
    p.add_argument("--weight-cap", type=float, default=4.0, help="the largest factor --sigma-weight applies")
    p.add_argument("--samplers", default=None, help="comma-separated (default: every sampler of the model's family)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT))
    from benchmarks import protocol
    from specdiff_zoo import load_shapes_dit

    seeds = [int(s) for s in a.seeds.split(",")]
    tolerances = [float(t) for t in a.tolerances.split(",")]
    results = []
    for name in a.models.split(","):
        model = load_shapes_dit(name)
        for sampler in a.samplers.split(",") if a.samplers else protocol.SAMPLERS_BY_FAMILY[model.family]:
            for steps in (int(s) for s in a.steps.split(",")):
                for c in cell(model, sampler, steps, seeds, tolerances, not a.no_hindsight, a.criterion, a.prompts,
                              a.sigma_weight, a.weight_cap):
                    c["model"] = name
                    print(f"tolerance {c['tolerance']:g} {name} {sampler} {steps}: {c['mean_psnr']:.2f} / "
                          f"{c['worst_psnr']:.2f} dB, full calls {c['full_fraction']:.1%}  {c['kinds'][0]}", flush=True)
                    results.append(c)
    for tol in tolerances:
        cells = [c for c in results if c["tolerance"] == tol]
        means = [c["mean_psnr"] for c in cells]
        print(f"tolerance {tol:g} (hindsight {'off' if a.no_hindsight else 'on'}, criterion {a.criterion}"
              f"{f', sigma weight {a.sigma_weight:g} (cap {a.weight_cap:g})' if a.sigma_weight else ''}), "
              f"{len(cells)} cells: mean of cells {sum(means) / len(means):.2f} dB, lowest cell {min(means):.2f}, "
              f"lowest worst image {min(c['worst_psnr'] for c in cells):.2f}, full calls "
              f"{sum(c['full_fraction'] for c in cells) / len(cells):.1%}", flush=True)
    return results


if __name__ == "__main__":
    main()
