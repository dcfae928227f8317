"""Correctness on a GPU: the invariant the test suite checks on the CPU, on the device's kernels.

One command, about a minute of compiles on a GPU for tiny models (``scripts/gpu_session.sh
check``)::

    python benchmarks/gpu_check.py                    # cuda: tiny SD3 and FLUX, bfloat16 and float32
    python benchmarks/gpu_check.py --dry-run          # CPU, the rewritten graphs as plain FX (CI, seconds)

Per model (``gpu_latency.py``'s tiny configs, random weights, the pipelines' sigmas, 8 Euler
steps, SD3 with batched CFG) and dtype, one generation in each mode, compared on the final
latents (``||x - x_eager|| / ||x_eager||``):

* ``eager``: the reference;
* ``inductor``: plain ``torch.compile``; its deviation is what the device's kernels and the
  dtype alone give;
* ``specdiff r=0``: ``cache_ratio=0``, the untouched graph through the backend;
* ``specdiff every token``: ``controller="fixed"``, ``warmup_steps=1``, ``cache_ratio=1e-6``
  (every image token computed on the cached calls), ``context_ratio=0`` (every text token),
  ``hindsight=False``: every call after the first runs the *sparse* variant (the token gathers,
  the K/V caches written in place, the extrapolation, the scatter of the outputs) with nothing
  left out, so it must give what the full graph gives;
* ``specdiff defaults``: finite output; its deviation and FLOPs are reported, not checked (random
  weights say nothing about fidelity).

Every specdiff mode must also have been compiled as asked (``last_record().status``: "plain" at
``cache_ratio=0``, else "specdiff"): a fallback to plain Inductor fails the check.

A check passes when the mode's deviation is at most twice Inductor's plus a floor (1e-4 in
float32, 2e-2 in bfloat16; on the CPU dry run, eager's place is taken by itself, the floor
alone). TF32 is off, so that float32 means float32. The table goes to ``--out``; the exit status
is 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_latency as gl  # noqa: E402

import specdiff_fx  # noqa: E402  (gpu_latency puts a checkout on the path when not installed)

#: the specdiff options of each checked mode
EVERY_TOKEN = {"controller": "fixed", "warmup_steps": 1, "cache_ratio": 1e-6, "context_ratio": 0.0,
               "hindsight": False}
SPECDIFF_MODES: dict[str, dict[str, Any]] = {
    "specdiff r=0": {"cache_ratio": 0.0},
    "specdiff every token": EVERY_TOKEN,
    "specdiff defaults": {},
}
CHECKED = ("specdiff r=0", "specdiff every token")
FLOOR = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


@dataclass
class Row:
    model: str
    dtype: str
    mode: str
    deviation: float  # relative L2 distance of the final latents from eager's
    seconds: float  # the generation, compiles included
    calls: str = ""  # specdiff: full / cached / skipped calls
    flops: float | None = None
    verdict: str = ""  # "ok", "FAIL ...", or "" (not checked)


def deviation(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


def run_model(spec: gl.ModelSpec, device: torch.device, dtype: torch.dtype, steps: int, inductor: bool,
              fx_only: bool) -> list[Row]:
    model = gl.build_transformer(spec, device, dtype)
    inputs = gl.make_inputs(spec, device, dtype)
    sigmas = gl.make_sigmas(spec, steps)
    name = str(dtype).removeprefix("torch.")
    rows: list[Row] = []

    def generate(fn: Any) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            x = gl.generate(spec, fn, inputs, sigmas, dtype)
        gl._sync(device)
        return x, time.perf_counter() - t0

    ref, seconds = generate(model)
    label = f"{spec.name.upper()} tiny"
    rows.append(Row(label, name, "eager", 0.0, seconds))
    base = 0.0
    if inductor:
        torch._dynamo.reset()
        x, seconds = generate(torch.compile(model))
        base = deviation(x, ref)
        rows.append(Row(label, name, "inductor", base, seconds))
    for mode, options in SPECDIFF_MODES.items():
        torch._dynamo.reset()
        opts = {**options, **({"inductor": False} if fx_only else {})}
        x, seconds = generate(torch.compile(model, backend="specdiff", options=opts))
        dev = deviation(x, ref)
        row = Row(label, name, mode, dev, seconds)
        record = specdiff_fx.last_record()  # what the backend did with the graph: a fallback is a failure here
        expected = "plain" if mode == "specdiff r=0" else "specdiff"
        report = specdiff_fx.last_generation() if expected == "specdiff" else None
        if record is None or record.status != expected:
            row.verdict = f"FAIL ({record.status}: {record.reason})" if record is not None else "FAIL (no record)"
            rows.append(row)
            continue
        if report is not None:
            kinds = [s.kind for s in report.steps]
            row.calls = f"{kinds.count('full')} / {kinds.count('cached')} / {kinds.count('skipped')}"
            row.flops = report.flops_fraction
        if mode in CHECKED:
            bound = 2 * base + FLOOR.get(dtype, 1e-2)
            row.verdict = "ok" if dev <= bound else f"FAIL (> {bound:.1e})"
            if mode == "specdiff every token" and report is not None and "cached" not in kinds:
                row.verdict = "FAIL (no sparse call ran)"
        elif not torch.isfinite(x).all():
            row.verdict = "FAIL (non-finite)"
        rows.append(row)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    lines = ["| model | dtype | mode | deviation from eager | s (compiles incl.) | full / cached / skipped | FLOPs | check |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flops = f"{r.flops:.1%}" if r.flops is not None else ""
        lines.append(f"| {r.model} | {r.dtype} | {r.mode} | {r.deviation:.2e} | {r.seconds:.1f} | {r.calls} | "
                     f"{flops} | {r.verdict} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sd3,flux", help="comma-separated: sd3, flux")
    p.add_argument("--dtypes", default=None, help="comma-separated (default bfloat16,float32; float32 with --dry-run)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dry-run", action="store_true", help="CPU, no Inductor: the rewritten graphs as plain FX")
    p.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    p.add_argument("--out", default="gpu_check.md", help="markdown file the table is written to")
    args = p.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names or any(m not in gl.TINY_SPECS for m in names):
        raise SystemExit(f"--models: {args.models!r}; choose from {sorted(gl.TINY_SPECS)}")
    dtypes = [getattr(torch, d.strip(), None) for d in (args.dtypes or ("float32" if args.dry_run else "bfloat16,float32")).split(",")]
    if any(not isinstance(d, torch.dtype) or not d.is_floating_point for d in dtypes):
        raise SystemExit(f"--dtypes: {args.dtypes!r}; e.g. bfloat16,float32")
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check: {where}, torch {torch.__version__}, {args.steps} steps{' [dry run]' if args.dry_run else ''}")
    rows: list[Row] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in dtypes:
            for name in names:
                rows += run_model(gl.TINY_SPECS[name], device, dtype, args.steps, inductor=not args.dry_run,
                                  fx_only=args.dry_run)
                Path(args.out).write_text(format_table(rows) + "\n")  # partial results survive a timeout
    table = format_table(rows)
    print(table)
    failed = [r for r in rows if r.verdict.startswith("FAIL")]
    print(f"\ngpu_check: {len(failed)} check(s) failed" if failed else "\ngpu_check: every check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
