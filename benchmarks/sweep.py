"""Speed / fidelity sweep on the shipped trained model; writes BENCHMARKS.md tables and a plot.

Every number is measured in this process, side by side: wall-clock per generation (median of
``--repeats`` after a warm-up that includes compilation) and its speedup over eager full compute
(median of ratios of eager/method pairs run alternately),
PSNR/SSIM of the final images against eager full compute, the FLOPs executed, the bytes held
by specdiff's caches and the compile time.

    python benchmarks/sweep.py                 # full sweep, writes BENCHMARKS.md section + PNG
    python benchmarks/sweep.py --tiny          # seconds: CI smoke mode (no files unless --write)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import specdiff_fx  # noqa: E402
from specdiff_fx import metrics  # noqa: E402
from specdiff_zoo import load_shapes_dit  # noqa: E402

PROMPTS = [
    "a red circle at the left on a blue background",
    "a yellow square at the top on a navy background",
    "a green triangle at the center on a white background",
    "a purple circle at the right on a gray background",
]
RATIOS = (0.5, 0.75, 0.9, 0.95, 0.99)
SPECULATIVE = (0, 2)
#: SpecDiff as published (attention score, three tiers, K/V reused), for comparison with the defaults
PAPER = {"score": "attention", "blend": True, "kv_extrapolation": False, "context_ratio": 0.0}


@dataclass
class Row:
    method: str
    params: str
    seconds: float  # median per generation
    speedup: float  # eager seconds / seconds
    psnr: float
    ssim: float
    flops: float  # fraction of full compute executed
    cache_mib: float
    compile_s: float


def _clock(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def timed(fn: Callable[[], torch.Tensor], repeats: int, baseline: Callable[[], torch.Tensor]
          ) -> tuple[torch.Tensor, float, float, float]:
    """(output, median seconds, first-call seconds, median speedup vs ``baseline``).

    The first call is the warm-up (it includes compilation). Then ``fn`` and ``baseline``
    run alternately ``repeats`` times and the speedup is the median of the per-pair ratios,
    so that a change of load on a shared machine hits both sides of each pair alike."""
    out, first = _clock(fn)
    times, ratios = [], []
    for _ in range(repeats):
        _, t_base = _clock(baseline)
        out, t = _clock(fn)
        times.append(t)
        ratios.append(t_base / t)
    return out, statistics.median(times), first, statistics.median(ratios)


def count_generation_flops(model, transformer, steps: int) -> int:
    from benchmarks.diffusers_caches import count_flops

    with torch.no_grad():
        return count_flops(lambda: model.sample(PROMPTS[:1], num_steps=steps, seed=0, transformer=transformer))[1]


def run(steps: int, repeats: int, tiny: bool, inductor: bool, caches: bool) -> tuple[list[Row], dict]:
    model = load_shapes_dit("sd3")
    prompts = PROMPTS[:1] if tiny else PROMPTS
    ratios = (0.9,) if tiny else RATIOS
    spec_steps = (2,) if tiny else SPECULATIVE
    torch.manual_seed(0)

    def gen(transformer):
        return model.sample(prompts, num_steps=steps, seed=0, transformer=transformer)

    rows: list[Row] = []

    import copy

    plain = copy.deepcopy(model.transformer)  # stays free of any cache hooks: the baseline

    def eager():
        return gen(plain)

    with torch.no_grad():
        ref, t_eager, _, _ = timed(eager, repeats, eager)
        rows.append(Row("eager", "full compute", t_eager, 1.0, float("inf"), 1.0, 1.0, 0.0, 0.0))
        full_flops = count_generation_flops(model, model.transformer, steps)
        if inductor:
            torch._dynamo.reset()
            comp = torch.compile(model.transformer)
            out, t, first, speedup = timed(lambda: gen(comp), repeats, eager)
            rows.append(Row("inductor", "full compute", t, speedup, metrics.psnr(out, ref),
                            metrics.ssim(out, ref), 1.0, 0.0, first - t))
        configs = [({"cache_ratio": r, "speculative_steps": s}, "") for s in spec_steps for r in ratios]
        if not tiny:
            configs.append(({"cache_ratio": 0.9, "speculative_steps": 2, **PAPER}, " (as published)"))
        for extra, label in configs:
            torch._dynamo.reset()
            comp = torch.compile(model.transformer, backend="specdiff", options={**extra, "inductor": inductor})
            out, t, first, speedup = timed(lambda: gen(comp), repeats, eager)
            rep = specdiff_fx.last_generation()
            params = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in extra.items())
            rows.append(Row("specdiff" + label, params, t, speedup,
                            metrics.psnr(out, ref), metrics.ssim(out, ref), rep.flops_fraction,
                            rep.cache_bytes / 2**20, rep.compile_seconds))
            print(f"  {rows[-1]}", flush=True)
        if caches:
            from benchmarks.diffusers_caches import SWEEP, cached_sampler

            for name, params in (SWEEP[:2] if tiny else SWEEP):
                transformer = cached_sampler(model, name, params, num_steps=steps)
                out, t, _, speedup = timed(lambda: gen(transformer), repeats, eager)
                flops = count_generation_flops(model, transformer, steps) / full_flops
                rows.append(Row(name, json.dumps(params, default=str), t, speedup, metrics.psnr(out, ref),
                                metrics.ssim(out, ref), flops, 0.0, 0.0))
                print(f"  {rows[-1]}", flush=True)
                if hasattr(transformer, "remove"):
                    transformer.remove()
    machine = {"machine": platform.machine(), "processor": platform.processor() or "unknown",
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    return rows, machine


def table(rows: list[Row]) -> str:
    lines = ["| method | parameters | s / generation | speedup vs eager | PSNR (dB) | SSIM | FLOPs executed | cache MiB | compile s (specdiff: variants) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.params} | {r.seconds:.3f} | {r.speedup:.2f}x | {r.psnr:.2f} | {r.ssim:.4f} | "
                     f"{r.flops:.1%} | {r.cache_mib:.2f} | {r.compile_s:.1f} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Speedup (x) against PSNR (y), one colour per method; drawn with Pillow."""
    from benchmarks.plotting import Point, scatter

    points = [Point(r.method, r.speedup, r.psnr) for r in rows if r.method != "eager" and r.psnr != float("inf")]
    scatter(points, path, x_label="speedup vs eager (wall clock)", y_label="PSNR vs full compute (dB)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="CI smoke mode: 1 prompt, few configs")
    p.add_argument("--no-inductor", action="store_true", help="run the rewritten graphs as plain FX")
    p.add_argument("--no-caches", action="store_true", help="skip diffusers' caches")
    p.add_argument("--write", action="store_true", help="write benchmarks/sweep.md, sweep.json and sweep.png")
    a = p.parse_args(argv)
    steps = min(a.steps, 6) if a.tiny else a.steps
    repeats = 1 if a.tiny else a.repeats
    rows, machine = run(steps, repeats, a.tiny, not a.no_inductor, not a.no_caches)
    text = table(rows)
    print(text)
    if a.write:
        out = ROOT / "benchmarks"
        (out / "sweep.md").write_text(
            f"Command: `python benchmarks/sweep.py{' --tiny' if a.tiny else ''}` ({steps} steps, "
            f"median of {repeats}); machine: {json.dumps(machine)}\n\n{text}\n")
        (out / "sweep.json").write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=1))
        plot(rows, out / "sweep.png")


if __name__ == "__main__":
    main()
