"""Load benchmark: several generations in flight on one compiled transformer.

N requests (one prompt and seed each, SD3 model, ``StableDiffusion3Pipeline``'s loop: shift 3,
batched CFG) run to completion together, either **interleaved** (one thread, one step of each
request in turn, as a batching-free server loop would) or **threaded** (one thread per request,
all calling the same compiled module). For each N and each way, the wall clock of the whole
batch of requests gives the throughput (images per second) of eager, Inductor and specdiff,
timed side by side in one process; every request's image is compared with its own eager run
alone (PSNR), and specdiff's executed transformer FLOPs with full compute (the telemetry of
each request's generation, read through :func:`specdiff_fx.track`).

Every compile happens before the clock starts: each method first runs one request alone.

    python benchmarks/load.py                  # N = 1, 2, 4; 28 steps; the table on stdout
    python benchmarks/load.py --write          # also benchmarks/load.md and load.json
    python benchmarks/load.py --tiny           # CI: N = 1, 2; 8 steps; specdiff on the plain-FX path
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import specdiff_fx  # noqa: E402
from benchmarks.protocol import NEGATIVE_PROMPT, PROMPTS, SD3_SCHEDULER, initial_noise  # noqa: E402
from specdiff_fx import metrics  # noqa: E402
from specdiff_zoo import load_shapes_dit  # noqa: E402

MODES = ("interleaved", "threaded")


class Request:
    """One generation, advanced a step at a time (``StableDiffusion3Pipeline``'s loop)."""

    def __init__(self, model: Any, transformer: Callable[..., Any], prompt: str, seed: int, steps: int) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.model, self.transformer = model, transformer
        self.scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
        self.scheduler.set_timesteps(steps)
        self.timesteps = list(self.scheduler.timesteps)
        hidden, pooled = model.encode([prompt])
        null_hidden, null_pooled = model.encode([NEGATIVE_PROMPT])
        self.hidden, self.pooled = torch.cat([null_hidden, hidden]), torch.cat([null_pooled, pooled])
        self.latents = initial_noise(seed, model.image_size, 1)
        self.guidance = float(model.config.get("default_guidance_scale", 4.0))
        self.tracker = specdiff_fx.track()  # this request's generation report(s)
        self.i = 0

    @property
    def done(self) -> bool:
        return self.i >= len(self.timesteps)

    def step(self) -> None:
        t = self.timesteps[self.i]
        x = torch.cat([self.latents] * 2)
        with self.tracker:
            pred = self.transformer(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=self.hidden,
                                    pooled_projections=self.pooled, return_dict=False)[0]
        uncond, cond = pred.chunk(2)
        self.latents = self.scheduler.step(uncond + self.guidance * (cond - uncond), t, self.latents,
                                           return_dict=False)[0]
        self.i += 1

    def image(self) -> torch.Tensor:
        return self.latents.float().clamp(-1, 1)

    def flops_fraction(self) -> float | None:
        reps = self.tracker.reports
        if not reps:
            return None
        done = sum(sum(s.flops for s in r.steps) for r in reps)
        return done / sum(len(r.main_steps) * r.full_flops for r in reps)


def run_requests(requests: Sequence[Request], mode: str) -> float:
    """Run every request to its end; the wall clock in seconds."""
    start = time.perf_counter()
    if mode == "interleaved":
        while not all(r.done for r in requests):
            for r in requests:
                if not r.done:
                    r.step()
    elif mode == "threaded":
        errors: list[BaseException] = []

        def work(r: Request) -> None:
            try:
                with torch.no_grad():
                    while not r.done:
                        r.step()
            except BaseException as e:  # noqa: BLE001  (re-raised below)
                errors.append(e)

        threads = [threading.Thread(target=work, args=(r,)) for r in requests]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return time.perf_counter() - start


def methods(model: Any, tiny: bool) -> dict[str, Callable[..., Any]]:
    torch._dynamo.reset()
    out: dict[str, Callable[..., Any]] = {"eager": model.transformer}
    if not tiny:
        out["inductor"] = torch.compile(model.transformer)
    out["specdiff"] = torch.compile(model.transformer, backend="specdiff",
                                    options={"inductor": False} if tiny else None)
    return out


@torch.no_grad()
def run(ns: Sequence[int], steps: int, tiny: bool, model_name: str = "sd3") -> dict:
    model = load_shapes_dit(model_name)
    fns = methods(model, tiny)
    requests_of = lambda fn, n: [Request(model, fn, PROMPTS[i], seed=i, steps=steps) for i in range(n)]  # noqa: E731
    # each request's reference: eager, alone
    refs = []
    for r in requests_of(model.transformer, max(ns)):
        run_requests([r], "interleaved")
        refs.append(r.image())
    for name, fn in fns.items():  # compile (and warm) every method outside the clock
        t = run_requests(requests_of(fn, 1), "interleaved")
        print(f"[load] warm-up {name}: {t:.1f} s", flush=True)
    alone = []  # each request's specdiff FLOPs when it runs alone (its prompt and seed decide them)
    for r in requests_of(fns["specdiff"], max(ns)):
        specdiff_fx.reset()
        run_requests([r], "interleaved")
        alone.append(r.flops_fraction())
    rows = []
    for n in ns:
        for mode in MODES:
            row: dict[str, Any] = {"n": n, "mode": mode}
            for name, fn in fns.items():
                specdiff_fx.reset()
                reqs = requests_of(fn, n)
                seconds = run_requests(reqs, mode)
                psnrs = [metrics.psnr(r.image(), refs[i]) for i, r in enumerate(reqs)]
                row[name] = {"seconds": seconds, "images_per_s": n / seconds, "psnr": psnrs,
                             "flops": [r.flops_fraction() for r in reqs] if name == "specdiff" else None}
            rows.append(row)
            print(line(row), flush=True)
    return {"model": model_name, "steps": steps, "tiny": tiny, "threads": torch.get_num_threads(), "alone_flops": alone,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "torch": torch.__version__}, "rows": rows}


def line(row: dict) -> str:
    base = row["eager"]["images_per_s"]
    cells = [f"{row['n']}", row["mode"]]
    for name in ("eager", "inductor", "specdiff"):
        cells.append(f"{row[name]['images_per_s']:.3f}" if name in row else "–")
    sd = row["specdiff"]
    cells.append(f"{sd['images_per_s'] / base:.2f}x")
    if "inductor" in row:
        cells.append(f"{sd['images_per_s'] / row['inductor']['images_per_s']:.2f}x")
    else:
        cells.append("–")
    finite = [p for p in sd["psnr"] if p != float("inf")]
    cells.append(f"{min(finite):.2f} / {sum(finite) / len(finite):.2f}" if finite else "exact")
    flops = [f for f in sd["flops"] if f is not None]
    cells.append(f"{sum(flops) / len(flops):.1%}" if flops else "–")
    return "| " + " | ".join(cells) + " |"


HEADER = ("| N | way | eager img/s | Inductor img/s | specdiff img/s | specdiff vs eager | vs Inductor "
          "| specdiff PSNR min / mean (dB) | specdiff FLOPs |\n|---|---|---|---|---|---|---|---|---|")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="1,2,4", help="generations in flight, comma-separated (default 1,2,4)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--tiny", action="store_true", help="CI: N = 1, 2; 8 steps; no Inductor")
    p.add_argument("--write", action="store_true", help="write load.md and load.json next to this script")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [1, 2] if args.tiny else [int(x) for x in args.n.split(",")]
    steps = 8 if args.tiny else args.steps
    print(HEADER, flush=True)
    data = run(ns, steps, args.tiny)
    if args.write:
        here = Path(__file__).resolve().parent
        (here / "load.json").write_text(json.dumps(data, indent=1))
        (here / "load.md").write_text(HEADER + "\n" + "\n".join(line(r) for r in data["rows"]) + "\n")
    return data


if __name__ == "__main__":
    main()
