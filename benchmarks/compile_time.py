"""The first generation's compile time, whole graphs against ``regional_compile=True``.

``python benchmarks/compile_time.py [--config mid | --model sd3_b] [--steps 28] [--rounds 4]``
runs, for each setting, one process with a fresh Inductor cache directory
(``TORCHINDUCTOR_CACHE_DIR``, FX graph cache off: a user's first run) that compiles the model
with ``backend="specdiff"`` and generates once; it reports the first generation's seconds, the
variants' compile seconds (``last_generation().compile_seconds``) and whether the two settings'
final latents agree (``--cold-jobs 2`` runs the two processes side by side: their seconds then
share the CPU, so they are no first-run timings; the smoke test's way). Then, in this process,
both settings generate ``--rounds`` times alternately after a warm-up round of both: the
steady-state seconds side by side (and eager's, for the ratio).

The workload, random weights unless a zoo model:

* ``--config mid``: 8 layers, hidden 512, 1024 image tokens; a 28-step SD3-style Euler loop
  with batched CFG.
* ``--config tiny``: 4 layers, hidden 64, 64 image tokens; checks the script in about a minute.
* ``--config deep``: the tiny config at SD3-medium's depth, 24 layers. Inductor's work grows
  with the graph's nodes, not with their width: SD3-medium's compile problem at a CPU's speed.
* ``--config flux_deep``: ``gpu_latency.py``'s tiny FLUX at FLUX.1-dev's depth (19 double + 38
  single blocks) and that script's generation (one call per step, guidance embedding).
* ``--model NAME`` (instead of ``--config``): a trained zoo model and the protocol's generation
  (its family's first sampler: SD3 with batched CFG, FLUX with true CFG; 8 prompts, seed 0).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SETTINGS = {"whole graphs": False, "regional_compile=True": True}
EAGER = "eager"

TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=32,
    pos_embed_max_size=16,
)


def model_and_inputs(config: str) -> tuple[torch.nn.Module, dict]:
    from diffusers import SD3Transformer2DModel

    from benchmarks import configs

    if config == "mid":
        return configs.mid_sd3(), configs.mid_inputs()
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**{**TINY_SD3, "num_layers": 24 if config == "deep" else TINY_SD3["num_layers"]})
    model = model.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 16, 16, 16, generator=g)
    return model, dict(hidden_states=torch.cat([lat, lat]), encoder_hidden_states=torch.randn(2, 12, 64, generator=g),
                       pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.full((2,), 1000.0))


def workload(config: str, model_name: str | None, steps: int) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]:
    """The transformer to compile and a function generating once with a given transformer."""
    if config == "flux_deep" and model_name is None:
        from dataclasses import replace

        from benchmarks import gpu_latency as g

        tiny = g.TINY_SPECS["flux"]
        spec = replace(tiny, label="FLUX tiny, 19 + 38 blocks",
                       config={**tiny.config, "num_layers": 19, "num_single_layers": 38})
        cpu = torch.device("cpu")
        model, inputs = g.build_transformer(spec, cpu, torch.float32), g.make_inputs(spec, cpu, torch.float32)
        sigmas = g.make_sigmas(spec, steps)
        return model, lambda fn: g.generate(spec, fn, inputs, sigmas, torch.float32)
    if model_name is None:
        from benchmarks.configs import euler_generate

        model, inputs = model_and_inputs(config)
        return model, lambda fn: euler_generate(fn, inputs, steps=steps)
    from benchmarks.time_breakdown import generation_setup

    zoo, _, sample, texts, noise = generation_setup(model_name, 8)
    return zoo.transformer, lambda fn: sample(zoo, fn, texts, noise, steps)


def child(config: str, model_name: str | None, regional: bool, steps: int, out: str) -> None:
    """One cold first generation; prints a JSON line and saves the final latents to ``out``."""
    import specdiff_fx

    model, generate = workload(config, model_name, steps)
    with torch.no_grad():
        compiled = torch.compile(model, backend="specdiff", options={"regional_compile": regional})
        t0 = time.perf_counter()
        x = generate(compiled)
        first = time.perf_counter() - t0
    report = specdiff_fx.last_generation()
    torch.save(x, out)
    print(json.dumps({"first_s": first, "compile_s": report.compile_seconds, "compiles": report.compiles,
                      "flops": report.flops_fraction}))


def cold(config: str, model_name: str | None, regional: bool, steps: int, out: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="specdiff_inductor_"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--config", config, "--steps", str(steps),
           "--child", "1" if regional else "0", "--out", out] + (["--model", model_name] if model_name else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steady(config: str, model_name: str | None, steps: int, rounds: int,
           options: dict | None = None) -> dict[str, list[float]]:
    """Each setting's (and eager's) generation seconds, ``rounds`` rounds side by side in this
    process after a warm-up round. ``options``: further specdiff options for both settings (the
    tests pass ``{"inductor": False}``)."""
    import specdiff_fx

    model, generate = workload(config, model_name, steps)
    fns: dict[str, Any] = {EAGER: model}
    with torch.no_grad():
        for name, regional in SETTINGS.items():  # no dynamo reset between: it would drop the first's code
            fns[name] = torch.compile(copy.deepcopy(model), backend="specdiff",
                                      options={**(options or {}), "regional_compile": regional})
            specdiff_fx.reset()
            generate(fns[name])  # compiles
        times: dict[str, list[float]] = {name: [] for name in fns}
        for r in range(rounds + 1):  # round 0: warm-up of all, not timed
            for name, fn in fns.items():
                specdiff_fx.reset()
                t0 = time.perf_counter()
                generate(fn)
                if r:
                    times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["mid", "tiny", "deep", "flux_deep"], default="mid")
    p.add_argument("--model", default=None, help="a zoo model (sd3_b, flux_64, ...) instead of --config")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--rounds", type=int, default=4, help="side-by-side rounds after the cold runs (0: none)")
    p.add_argument("--cold-jobs", type=int, default=1, choices=[1, 2],
                   help="cold processes at a time (2: side by side, sharing the CPU: their seconds are then no "
                        "first-run timings; for smoke tests)")
    p.add_argument("--child", choices=["0", "1"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    if a.child is not None:
        child(a.config, a.model, a.child == "1", a.steps, a.out)
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        with concurrent.futures.ThreadPoolExecutor(max_workers=a.cold_jobs) as pool:
            runs = {name: pool.submit(cold, a.config, a.model, regional, a.steps, os.path.join(tmp, f"{int(regional)}.pt"))
                    for name, regional in SETTINGS.items()}
            firsts = {name: run.result() for name, run in runs.items()}
        latents = [torch.load(os.path.join(tmp, f"{int(r)}.pt")) for r in SETTINGS.values()]
    diff = float((latents[0] - latents[1]).abs().max())
    # --rounds 0: the cold first generations only
    times = steady(a.config, a.model, a.steps, a.rounds) if a.rounds > 0 else {n: [] for n in (*SETTINGS, EAGER)}
    what = f"model {a.model}" if a.model else f"{a.config} config"
    print(f"{what}, {a.steps} steps, {torch.get_num_threads()} threads; final latents differ by at most "
          f"{diff:.3g} (scale {float(latents[0].abs().max()):.3g})")
    print("| setting | first generation s (cold) | variants' compiles s | later generations s (median; all) "
          "| eager / it, per round |")
    print("|---|---|---|---|---|")
    eager = times[EAGER]

    def later(t: list[float]) -> str:
        return f"{statistics.median(t):.2f} ({' / '.join(f'{x:.2f}' for x in t)})" if t else "-"

    for name in SETTINGS:
        f, t = firsts[name], times[name]
        print(f"| {name} | {f['first_s']:.1f} | {f['compile_s']:.1f} ({f['compiles']}) | {later(t)} | "
              f"{' / '.join(f'{e / x:.2f}x' for e, x in zip(eager, t)) or '-'} |")
    print(f"| eager | | | {later(eager)} | |")
    return {"first": firsts, "steady": times, "latent_diff": diff}


if __name__ == "__main__":
    main()
