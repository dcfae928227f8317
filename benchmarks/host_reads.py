"""How often a specdiff call reads tensor values back to the host, by call kind, and where.

``python benchmarks/host_reads.py [--model sd3_b] [--steps 28] [--prompts 8]`` generates the
evaluation protocol's prompts (seed 0, the family's first sampler) with
``backend="specdiff"`` (defaults, or ``--specdiff JSON``; ``--no-inductor`` for plain FX), once to
warm up and once counted. During each transformer call it counts the reads of tensor values on
the host (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``torch.equal``, ``nonzero``) and
names the line of ``specdiff_fx`` that made each. On a GPU each read of a device tensor waits
for every kernel queued before it; one after the compiled variant has been launched keeps the
host from queueing the sampler's next work and the next call while the GPU runs it. On the CPU
nothing waits: this counts the reads, it does not time them (reads of tensors that live on the
CPU anyway, such as the runtime's small group tables, are counted too).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "nonzero")


class ReadCounter:
    """Counts host reads of tensor values while ``active``; ``where`` by the ``specdiff_fx``
    line that made them (``(outside)`` for reads made elsewhere during a call)."""

    def __init__(self) -> None:
        self.active = False
        self.count = 0
        self.where: collections.Counter[str] = collections.Counter()

    def hit(self, name: str) -> None:
        self.count += 1
        frames = [f for f in traceback.extract_stack()[:-2] if f"{os.sep}specdiff_fx{os.sep}" in f.filename]
        f = frames[-1] if frames else None
        self.where[f"{name} {Path(f.filename).name}:{f.lineno} {f.name}" if f else f"{name} (outside)"] += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator["ReadCounter"]:
        saved = {n: getattr(torch.Tensor, n) for n in READS}
        equal = torch.equal

        def wrap(name: str, orig: Any) -> Any:
            def read(t: torch.Tensor, *a: Any, **k: Any) -> Any:
                if self.active and t.numel() > 0:
                    self.hit(name)
                return orig(t, *a, **k)
            return read

        def counted_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
            if self.active:
                self.hit("torch.equal")
            return equal(a, b)

        try:
            for n, orig in saved.items():
                setattr(torch.Tensor, n, wrap(n, orig))
            torch.equal = counted_equal
            yield self
        finally:
            for n, orig in saved.items():
                setattr(torch.Tensor, n, orig)
            torch.equal = equal


def measure(model_name: str = "sd3_b", steps: int = 28, prompts: int = 8, options: dict | None = None,
            inductor: bool = True) -> dict:
    """Per call kind: calls and host reads per call (min, median, max); the reads by line."""
    import specdiff_fx
    from benchmarks.time_breakdown import generation_setup, split_by_kind

    model, sampler, sample, texts, noise = generation_setup(model_name, prompts)
    opts = {**(options or {}), **({} if inductor else {"inductor": False})}
    compiled = torch.compile(copy.deepcopy(model.transformer), backend="specdiff", options=opts)
    counter, per_call = ReadCounter(), []

    class Counted:
        def __getattr__(self, name: str) -> Any:
            return getattr(compiled, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            before = counter.count
            counter.active = True
            try:
                return compiled(*args, **kwargs)
            finally:
                counter.active = False
                per_call.append(counter.count - before)

    with torch.no_grad(), counter.installed():
        specdiff_fx.reset()
        sample(model, compiled, texts, noise, steps)  # warm-up: compiles
        specdiff_fx.reset()
        sample(model, Counted(), texts, noise, steps)
    by_kind = split_by_kind(per_call, specdiff_fx.last_generation())  # raises if the counts disagree
    return {
        "model": model_name, "sampler": sampler, "steps": steps, "prompts": prompts,
        "kinds": {k: {"calls": len(v), "min": min(v), "median": sorted(v)[len(v) // 2], "max": max(v)}
                  for k, v in by_kind.items() if v},
        "where": dict(counter.where.most_common()),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd3_b")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--specdiff", default="{}", help="JSON options for the specdiff backend")
    p.add_argument("--no-inductor", action="store_true", help="plain FX instead of Inductor")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    out = measure(a.model, a.steps, a.prompts, json.loads(a.specdiff), inductor=not a.no_inductor)
    print(f"{out['model']}, {out['sampler']}, {out['steps']} steps, {out['prompts']} prompts")
    print("| call kind | calls | host reads per call: min | median | max |\n|---|---|---|---|---|")
    for k, v in out["kinds"].items():
        print(f"| {k} | {v['calls']} | {v['min']} | {v['median']} | {v['max']} |")
    print("\nreads in the counted generation, by line:")
    for where, n in out["where"].items():
        print(f"{n:6d}  {where}")
    return out


if __name__ == "__main__":
    main()
