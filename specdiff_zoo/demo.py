"""The demo: generate images with and without specdiff on the shipped trained model.

Runs a handful of prompts through (a) plain eager, (b) Inductor (``torch.compile``'s
default backend) and (c) ``backend="specdiff"`` at the default options, 28 Euler steps
with classifier-free guidance; prints wall-clock per image, speedups (same process),
PSNR/SSIM of specdiff against full compute and the fraction of transformer FLOPs
executed; writes a PNG grid: full | specdiff | |difference| | how often each token was
recomputed.

    python -m specdiff_zoo.demo [--family sd3|flux] [--steps 28] [--out demo.png]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from specdiff_fx import metrics
from specdiff_fx.telemetry import last_generation
from specdiff_zoo import load_shapes_dit, to_uint8

PROMPTS = [
    "a red circle at the left on a blue background",
    "a yellow square at the top on a navy background",
    "a green triangle at the center on a white background",
    "a purple circle at the right on a gray background",
]


def heat_map(counts: torch.Tensor, steps: int, size: int, grid: int) -> torch.Tensor:
    """``[3, size, size]`` image in [-1, 1]: white = recomputed on every cached step."""
    frac = counts.float().reshape(grid, grid) / max(1, steps)
    up = torch.nn.functional.interpolate(frac[None, None], size=(size, size), mode="nearest")[0, 0]
    red = up * 2 - 1
    return torch.stack([red.clamp(-1, 1), (up * 1.2 - 1).clamp(-1, 1), (up * 2 - 1.6).clamp(-1, 1)])


def save_grid(path: Path, rows: list[list[torch.Tensor]], scale: int = 4) -> None:
    from PIL import Image

    tiles = [torch.cat(row, dim=2) for row in rows]  # [3, H, W*cols]
    image = torch.cat(tiles, dim=1)
    image = torch.nn.functional.interpolate(image[None], scale_factor=scale, mode="nearest")
    Image.fromarray(to_uint8(image)[0].numpy()).save(path)


def run(family: str = "sd3", steps: int = 28, repeats: int = 3, out: str = "demo.png",
        prompts: list[str] | None = None, inductor: bool = True) -> dict:
    """Run the demo; ``inductor=False`` (smoke tests) skips Inductor: the "inductor" row is
    then eager again and specdiff runs its rewritten graphs as plain FX."""
    torch.manual_seed(0)
    prompts = prompts or PROMPTS
    model = load_shapes_dit(family)
    n = len(prompts)
    print(f"specdiff demo: trained shapes model ({family}), {n} prompts, {steps} steps, "
          f"{'CFG in one batch' if family == 'sd3' else 'guidance embedding (no CFG)'}, "
          f"{torch.get_num_threads()} CPU threads")

    def generate(transformer) -> torch.Tensor:
        return model.sample(prompts, num_steps=steps, seed=0, transformer=transformer)

    from tqdm.auto import tqdm

    results: dict[str, dict] = {"eager": {}, "inductor": {}, "specdiff": {}}
    with torch.no_grad():
        generate(model.transformer)  # warm-up: lazy initialisation, allocator

        print("compiling with Inductor (the first run includes compile time) ...", flush=True)
        torch._dynamo.reset()
        compiled = torch.compile(model.transformer) if inductor else model.transformer
        t0 = time.perf_counter()
        generate(compiled)
        results["inductor"]["first"] = time.perf_counter() - t0

        print("compiling with specdiff (its variants; the first run includes compile time) ...",
              flush=True)
        spec = torch.compile(model.transformer, backend="specdiff", options={} if inductor else {"inductor": False})
        t0 = time.perf_counter()
        generate(spec)
        results["specdiff"]["first"] = time.perf_counter() - t0

        # timed rounds: the three run one after another in every round, so that a change of
        # load on a shared machine hits all three alike; ratios are medians of per-round ratios
        runs = {"eager": model.transformer, "inductor": compiled, "specdiff": spec}
        images: dict[str, torch.Tensor] = {}
        for _ in tqdm(range(repeats), desc="timed rounds", leave=False, file=sys.stdout):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                images[name] = generate(fn)
                results[name].setdefault("times", []).append(time.perf_counter() - t0)
        eager_img, ind_img, spec_img = images["eager"], images["inductor"], images["specdiff"]
        report = last_generation()

    per_image = {k: statistics.median(v["times"]) / n for k, v in results.items()}

    def ratio(a: str, b: str) -> float:  # how many times faster b is than a, per round
        return statistics.median(x / y for x, y in zip(results[a]["times"], results[b]["times"]))

    fidelity = {
        "psnr": metrics.psnr(spec_img, eager_img),
        "ssim": metrics.ssim(spec_img, eager_img),
        "inductor_psnr": metrics.psnr(ind_img, eager_img),
    }
    flops = report.flops_fraction if report is not None else float("nan")
    print()
    print(f"{'':10} {'s / image':>10} {'vs eager':>9} {'vs inductor':>12} {'first run (s)':>14}")
    for k in ("eager", "inductor", "specdiff"):
        first = results[k].get("first")
        print(f"{k:10} {per_image[k]:10.4f} {ratio('eager', k):8.2f}x "
              f"{ratio('inductor', k):11.2f}x {first if first else 0:14.1f}")
    print()
    print(f"specdiff vs full compute (eager): PSNR {fidelity['psnr']:.2f} dB, SSIM {fidelity['ssim']:.4f}; "
          f"Inductor vs eager PSNR {fidelity['inductor_psnr']:.1f} dB")
    print(f"transformer FLOPs executed by specdiff: {flops:.1%} of full compute")
    if report is not None:
        print(report.summary().splitlines()[1].strip())

    rows = []
    grid = int(round(report.num_image_tokens ** 0.5)) if report is not None else 16
    cached = report.count("cached") if report is not None else 0
    for i in range(n):
        diff = ((spec_img[i] - eager_img[i]).abs() * 4 - 1).clamp(-1, 1)
        counts = report.computed_counts[n + i if family == "sd3" else i] if (
            report is not None and report.computed_counts is not None) else torch.zeros(grid * grid)
        rows.append([eager_img[i], spec_img[i], diff, heat_map(counts, cached, eager_img.shape[-1], grid)])
    save_grid(Path(out), rows)
    print(f"wrote {out}: full | specdiff | |difference| x4 | token recompute frequency (per prompt)")
    return {"per_image": per_image, "speedup": {k: ratio("eager", k) for k in runs},
            "fidelity": fidelity, "flops_fraction": flops, "results": results,
            "report": report}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sd3", "flux"], default="sd3")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="demo.png")
    args = parser.parse_args(argv)
    run(args.family, args.steps, args.repeats, args.out)


if __name__ == "__main__":
    main()
