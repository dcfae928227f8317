"""Where a given number of full calls does the most good: a local search over step schedules.

    python benchmarks/schedule_search.py --model sd3 --sampler sd3_cfg --steps 20 --full 7
    python benchmarks/schedule_search.py --model sd3 --sampler sd3_cfg --steps 20 --evaluate fssfssfssfssfssfssfs

No specdiff runtime is involved. A *schedule* has one letter per step: ``f`` (full: the untouched
transformer's output, plus :class:`specdiff_fx.runtime.hindsight.Hindsight`'s correction of the
skipped calls before it, as the library's full calls return) or ``s`` (skipped: the branch's last
full output, every token reused, as the library's skipped calls return). Under true CFG the calls of
a step share its letter. The first call and the final jump (the rule of
:meth:`specdiff_fx.control.error.ErrorControlled.final_jump`) are full whatever the schedule says, as
in ``oracle_schedule.py``; the transformer runs on full steps only.

``--full K`` searches for the best schedule with ``K`` full steps: from evenly spaced starts (and
any ``--start`` schedules), move one full step at a time to wherever the first seed's images are
best (the worst image, then the mean), until no move improves; the schedules found are then
evaluated on every seed. ``--evaluate`` evaluates the given schedules on every seed.

What it bounds: ``oracle_schedule.py`` decides each call greedily, on the error of reusing at that
call; this searches over placements, knowing the images (it is fitted to the first seed's images:
the other seeds say whether what it finds holds). Where it finds much better images than the
greedy placement at the same number of full calls, the placement, not the error estimate nor what a
cached call returns, is what the controller leaves on the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]


class ScheduleCaller:
    """A callable standing in for the transformer in a protocol sampler: full or skipped per step
    as ``schedule`` says (module docstring)."""

    def __init__(self, transformer: Any, timestep_per_sigma: float, branches: int, schedule: str,
                 hindsight: bool = True) -> None:
        from benchmarks.oracle_schedule import ReuseState

        self.transformer, self.timestep_per_sigma, self.branches = transformer, timestep_per_sigma, branches
        self.schedule = schedule
        self.calls = 0
        self.state = ReuseState(branches, hindsight)  # what a full or skipped call returns, as the oracle's
        self.kinds: list[str] = []  # per step, as run: "f" or "s"
        self._full = True

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        from specdiff_fx.control.base import StepView
        from specdiff_fx.control.error import ErrorControlled

        b = self.calls % self.branches
        self.calls += 1
        sigma = float(kwargs["timestep"].max()) / self.timestep_per_sigma
        last = self.state.last
        if b == 0:  # the step's first call decides for its calls
            i = len(self.kinds)
            view = StepView(step=i, sigma=sigma, sigmas=tuple(self.state.sigmas[0]), num_tokens=0)
            self._full = (last[0] is None or ErrorControlled.final_jump(view)
                          or (i < len(self.schedule) and self.schedule[i] == "f"))
            self.kinds.append("f" if self._full else "s")
        full = self._full or last[b] is None
        true = self.transformer(*args, **kwargs)[0] if full else None  # the transformer runs on full steps only
        return (self.state.settle(b, sigma, true, full),)


class Cell:
    """One (model, sampler, steps) cell: the reference images per seed, and schedules evaluated
    against them (memoised)."""

    def __init__(self, name: str, sampler: str, steps: int, seeds: Sequence[int], prompts: int = 8,
                 hindsight: bool = True) -> None:
        from benchmarks import protocol
        from specdiff_fx.families import FAMILIES
        from specdiff_zoo import load_shapes_dit

        self.protocol, self.sampler, self.steps, self.hindsight = protocol, sampler, steps, hindsight
        self.model = load_shapes_dit(name)
        self.timestep_per_sigma = next(f.timestep_per_sigma for f in FAMILIES if f.name == self.model.family)
        self.texts = protocol.PROMPTS[:prompts]
        self.refs = {}
        with torch.no_grad():
            for seed in seeds:
                noise = protocol.initial_noise(seed, protocol.image_size(self.model), prompts)
                self.refs[seed] = (noise, protocol.SAMPLERS[sampler](self.model, self.model.transformer, self.texts,
                                                                     noise, steps))
        self._seen: dict[tuple[str, int], dict] = {}

    def evaluate(self, schedule: str, seed: int) -> dict:
        """The schedule's images against the seed's reference: worst and mean PSNR, the steps as run."""
        key = (schedule, seed)
        if key not in self._seen:
            noise, ref = self.refs[seed]
            caller = ScheduleCaller(self.model.transformer, self.timestep_per_sigma,
                                    self.protocol.CALLS_PER_STEP[self.sampler], schedule, self.hindsight)
            with torch.no_grad():
                images = self.protocol.SAMPLERS[self.sampler](self.model, caller, self.texts, noise, self.steps)
            psnr = self.protocol._per_image(images, ref)[0]
            self._seen[key] = {"worst": min(psnr), "mean": sum(psnr) / len(psnr), "kinds": "".join(caller.kinds)}
        return self._seen[key]

    @property
    def evaluations(self) -> int:
        return len(self._seen)


def evenly_spaced(steps: int, forced: str, full: int) -> str:
    """``full`` full steps: the forced ones and the rest spread evenly over the other steps."""
    free = [i for i in range(steps) if forced[i] != "f"]
    n = full - forced.count("f")
    if n <= 0 or not free:
        return forced
    picks = {free[round(j * (len(free) - 1) / (n - 1))] for j in range(n)} if n > 1 else {free[len(free) // 2]}
    return "".join("f" if forced[i] == "f" or i in picks else "s" for i in range(steps))


def search(cell: Cell, start: str, seed: int) -> tuple[str, dict]:
    """Moves of one full step, best first, from ``start`` until none improves the seed's images."""
    forced = cell.evaluate("s" * cell.steps, seed)["kinds"]
    free = [i for i in range(cell.steps) if forced[i] != "f"]
    score = lambda r: (r["worst"], r["mean"])  # noqa: E731
    cur, best = start, cell.evaluate(start, seed)
    while True:
        move = None
        for a in (i for i in free if cur[i] == "f"):
            for b in (i for i in free if cur[i] != "f"):
                cand = cur[:a] + "s" + cur[a + 1:]
                cand = cand[:b] + "f" + cand[b + 1:]
                r = cell.evaluate(cand, seed)
                if score(r) > score(best):
                    move, best = cand, r
        if move is None:
            return cur, best
        cur = move


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sd3", help="a zoo model (default sd3, tune)")
    p.add_argument("--sampler", default="sd3_cfg")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--full", type=int, default=None, help="search for the best schedule with this many full steps")
    p.add_argument("--start", default="", help="comma-separated schedules to start the search from as well")
    p.add_argument("--evaluate", default="", help="comma-separated schedules to evaluate (no search)")
    p.add_argument("--seeds", default="0,1", help="the first is searched on; every one evaluated")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--no-hindsight", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.full is None and not a.evaluate:
        p.error("give --full K (search) or --evaluate SCHEDULES")
    for s in (a.evaluate.split(",") if a.evaluate else []) + (a.start.split(",") if a.start else []):
        if len(s) != a.steps or set(s) - {"f", "s"}:  # before the references are generated
            p.error(f"a schedule is {a.steps} letters f or s, got {s!r}")
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT))
    seeds = [int(s) for s in a.seeds.split(",")]
    t0 = time.time()
    cell = Cell(a.model, a.sampler, a.steps, seeds, a.prompts, not a.no_hindsight)
    found = [s for s in a.evaluate.split(",") if s]
    if a.full is not None:
        forced = cell.evaluate("s" * a.steps, seeds[0])["kinds"]
        starts = [s for s in a.start.split(",") if s] + [evenly_spaced(a.steps, forced, a.full)]
        for s in starts:
            found.append(search(cell, s, seeds[0])[0])
            print(f"from {s}: {found[-1]} ({cell.evaluations} evaluations, {time.time() - t0:.0f} s)", flush=True)
    results = []
    for s in dict.fromkeys(found):
        per = [cell.evaluate(s, seed) for seed in seeds]
        row = {"model": a.model, "sampler": a.sampler, "steps": a.steps, "schedule": per[0]["kinds"],
               "full_fraction": per[0]["kinds"].count("f") / a.steps, "seeds": seeds,
               "worst": [round(r["worst"], 2) for r in per], "mean": [round(r["mean"], 2) for r in per]}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


if __name__ == "__main__":
    main()
