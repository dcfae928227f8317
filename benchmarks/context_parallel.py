"""Context parallelism: specdiff on N processes (diffusers Ulysses) against one process.

    python benchmarks/context_parallel.py                  # 2 gloo processes on CPU, trained FLUX, 28 steps
    python benchmarks/context_parallel.py --tiny           # seconds: CI smoke mode
    torchrun --nproc-per-node 4 benchmarks/context_parallel.py --device cuda --model flux_64

Each rank builds the same model (``specdiff_zoo``, trained weights from the repo; ``--random``
for the random-weight "mid"-sized FLUX), turns on
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` with the
``"native"`` attention backend and samples as ``FluxPipeline`` does (dynamic shift, no
CFG). Rank 0 also runs the single-process reference (full compute, and specdiff) before
the group starts. Reported: per rank and in all, executed FLOPs (specdiff's report) and the
FLOPs of one full call; PSNR against single-process full compute of the CP run at
``cache_ratio=0`` (exactness), of specdiff under CP and of specdiff on one process; wall
clock of a CP generation with and without specdiff (same process, side by side, after a
first untimed generation that compiles; on CPU with gloo the exchange dominates at these
sizes: read the ratios only). ``tests/test_context_parallel.py`` runs :func:`worker` (no
timing) and checks what it returns.

Without ``torchrun`` the script starts the N processes itself (``torch.multiprocessing``,
gloo on CPU, nccl with ``--device cuda``); under ``torchrun`` it joins the group torchrun
made. :func:`spawn` is the harness the tests use too.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


# -- the harness --------------------------------------------------------------------------
def _entry(rank: int, world: int, init: str, backend: str, target: Callable[..., Any], args: tuple,
           out_dir: str, wait: float) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=wait))
    try:
        result = target(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(world: int, target: Callable[..., Any], *args: Any, backend: str = "gloo",
          timeout: float = 3600.0, collective_timeout: float = 1800.0) -> list[Any]:
    """Run ``target(rank, world, *args)`` in ``world`` fresh processes joined in one process
    group; return each rank's result, in rank order. Raises ``RuntimeError`` with the
    failing rank's traceback if any rank fails (a collective waits at most
    ``collective_timeout`` seconds for the others: one rank compiling with Inductor while
    another waits takes minutes on a CPU), ``TimeoutError`` (after killing them all) if they
    do not finish in ``timeout`` seconds — never hangs."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="specdiff_cp_") as out_dir:
        init = "file://" + os.path.join(out_dir, "rendezvous")
        ctx = mp.start_processes(_entry, args=(world, init, backend, target, args, out_dir, collective_timeout),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world} ranks did not finish in {timeout:.0f} s")
        except mp.ProcessRaisedException as e:
            errors = sorted(Path(out_dir).glob("rank*.err"))
            raise RuntimeError("a rank failed:\n" + "\n".join(p.read_text() for p in errors)) from e
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def enable_context_parallel(transformer: torch.nn.Module, world: int) -> None:
    """diffusers' Ulysses context parallelism over ``world`` ranks, ``"native"`` attention."""
    from diffusers import ContextParallelConfig

    if not torch.cuda.is_available():  # diffusers builds its mesh over the accelerators: one per process here
        torch.accelerator.device_count = lambda: 1
    transformer.set_attention_backend("native")
    transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))


# -- the benchmark --------------------------------------------------------------------------
def _generate(model, transformer, steps: int, prompts: list[str]) -> torch.Tensor:
    from benchmarks import protocol

    noise = protocol.initial_noise(0, model.image_size, len(prompts)).to(model.device)
    with torch.no_grad():
        return protocol.SAMPLERS["flux_nocfg"](model, transformer, prompts, noise, steps)


def _timed(fn: Callable[[], torch.Tensor], device: str, warm: bool = True,
           repeat: int = 3) -> tuple[torch.Tensor, float]:
    """``fn()`` and its median wall time over ``repeat`` runs; with ``warm`` a first call
    (compiles) is not timed."""
    if warm:
        fn()
    times = []
    for _ in range(max(1, repeat)):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, sorted(times)[len(times) // 2]


class ExchangeCounter:
    """Counts the bytes this rank sends through specdiff's all-to-all exchanges in each call of
    ``transformer`` made through this object, while the ``with`` block is open (compiled with
    ``inductor=False``: the exchanges are :mod:`specdiff_fx.ops` functions then, counted by
    wrapping them). A full call exchanges what diffusers' own Ulysses attention does (queries,
    keys, values and outputs of every token of the rank). ``calls``: bytes per call, in order."""

    def __init__(self, transformer: Any) -> None:
        self.transformer, self.calls, self._sent = transformer, [], []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._sent.clear()
        out = self.transformer(*args, **kwargs)
        self.calls.append(sum(self._sent))
        return out

    def __enter__(self) -> "ExchangeCounter":
        from torch._subclasses.fake_tensor import FakeTensor

        from specdiff_fx import ops

        self._inner = inner = ops._all_to_all

        def counting(x: torch.Tensor, group_name: str, world_size: int) -> torch.Tensor:
            if not isinstance(x, FakeTensor):  # not shape propagation while a variant is built
                self._sent.append(x.numel() * x.element_size())
            return inner(x, group_name, world_size)

        ops._all_to_all = counting
        return self

    def __exit__(self, *exc: Any) -> None:
        from specdiff_fx import ops

        ops._all_to_all = self._inner


def worker(rank: int, world: int, opts: dict) -> dict:
    """One rank of the benchmark (also what ``torchrun`` runs)."""
    import torch.distributed as dist

    import specdiff_fx
    from specdiff_fx import metrics
    from specdiff_zoo import load_shapes_dit

    device = f"cuda:{rank % max(1, torch.cuda.device_count())}" if opts["device"] == "cuda" else "cpu"
    if device != "cpu":
        torch.cuda.set_device(device)
    model = load_shapes_dit(opts["model"], device=device)
    prompts = list(opts["prompts"])
    steps, inductor = opts["steps"], opts["inductor"]
    result: dict[str, Any] = {"rank": rank}
    if rank == 0:  # the single-process reference, before the model is sharded
        ref, result["t_single_eager"] = _timed(lambda: _generate(model, model.transformer, steps, prompts), device,
                                              repeat=opts.get("repeat", 1))
        torch._dynamo.reset()
        single = torch.compile(model.transformer, backend="specdiff", options={"inductor": inductor})
        img, result["t_single_specdiff"] = _timed(lambda: _generate(model, single, steps, prompts), device,
                                                  opts["warm"], opts.get("repeat", 1))
        rep = specdiff_fx.last_generation()
        result.update(single_psnr=metrics.psnr(img, ref), single_flops=sum(s.flops for s in rep.steps),
                      single_full_flops=rep.full_flops, single_fraction=rep.flops_fraction)
        result["ref"] = ref.cpu()
    dist.barrier()
    enable_context_parallel(model.transformer, world)
    runs = {"plain": {"inductor": inductor, "cache_ratio": 0.0}, "specdiff": {"inductor": inductor}}
    images, counter = {}, None
    for name, options in runs.items():
        torch._dynamo.reset()
        compiled = torch.compile(model.transformer, backend="specdiff", options=options)
        if name == "specdiff" and not inductor:  # count the exchanges in this run (their cost is small)
            compiled = counter = ExchangeCounter(compiled)

        def generate() -> torch.Tensor:
            if counter is not None:
                counter.calls.clear()  # the last timed generation's calls
            return _generate(model, compiled, steps, prompts)

        with counter or contextlib.nullcontext():
            images[name], result[f"t_{name}"] = _timed(generate, device, opts["warm"], opts.get("repeat", 1))
        if name == "specdiff":
            rep = specdiff_fx.last_generation()
            if rep is None or rep.parallel is None:
                raise RuntimeError(f"specdiff did not run under context parallelism: {specdiff_fx.last_record()}")
            reports = specdiff_fx.gather_reports(rep)
            whole = specdiff_fx.aggregate(reports)  # raises if the ranks' decisions differ
            result.update(flops=sum(s.flops for s in rep.steps), full_flops=rep.full_flops, parallel=rep.parallel,
                          tokens=rep.num_image_tokens, whole_tokens=whole.num_image_tokens,
                          kinds="".join(s.kind[0] for s in rep.main_steps), record=str(specdiff_fx.last_record()),
                          whole_fraction=whole.flops_fraction, fraction=rep.flops_fraction)
    if counter is None:  # what goes through the exchanges, per call (untimed, without Inductor)
        torch._dynamo.reset()
        counter = ExchangeCounter(torch.compile(model.transformer, backend="specdiff", options={"inductor": False}))
        with counter:
            _generate(model, counter, steps, prompts)
    calls = counter.calls
    kinds = "".join(s.kind[0] for s in specdiff_fx.last_generation().main_steps)
    result["exchanged"] = {kind: sorted({b for b, k in zip(calls, kinds) if k == kind}) for kind in set(kinds)}
    result["exchanged_total"] = sum(calls)
    result.update({f"img_{k}": v.cpu() for k, v in images.items()})
    return result


def table(results: list[dict]) -> str:
    r0 = results[0]
    from specdiff_fx import metrics

    ref = r0["ref"]
    rows = ["| run | PSNR vs one process, full compute | FLOPs executed (of full compute) | FLOPs per rank vs one process | s / generation |",
            "|---|---|---|---|---|",
            f"| one process, full compute | ref | 100% | – | {r0['t_single_eager']:.3f} |",
            f"| one process, specdiff | {r0['single_psnr']:.2f} | {r0['single_fraction']:.1%} | – | {r0['t_single_specdiff']:.3f} |",
            f"| {len(results)} ranks, `cache_ratio=0` | {metrics.psnr(r0['img_plain'], ref):.2f} | 100% | "
            f"{r0['full_flops'] / r0['single_full_flops']:.3f} (one call) | {r0['t_plain']:.3f} |"]
    for r in results:
        rows.append(f"| {len(results)} ranks, specdiff, rank {r['rank']} | {metrics.psnr(r['img_specdiff'], ref):.2f} | "
                    f"{r['fraction']:.1%} | {r['flops'] / r0['single_flops']:.3f} | {r['t_specdiff']:.3f} |")
    rows.append(f"| {len(results)} ranks, specdiff, all ranks | | {r0['whole_fraction']:.1%} | "
                f"{sum(r['flops'] for r in results) / r0['single_flops']:.3f} (sum) | |")
    ex = r0["exchanged"]
    full, cached = max(ex["f"]), max(ex.get("c", [0]))
    steps = len(r0["kinds"])
    exchange = (f"All-to-all bytes a rank sends (rank 0): a full call {full / 1e3:.1f} kB (what diffusers' "
                f"Ulysses attention sends per call), a cached call {cached / 1e3:.1f} kB "
                f"({cached / full:.1%} of a full one); a specdiff generation {r0['exchanged_total'] / 1e6:.2f} MB "
                f"against {steps * full / 1e6:.2f} MB for {steps} full calls "
                f"({r0['exchanged_total'] / (steps * full):.1%}).")
    return ("\n".join(rows) + f"\n\nDecisions (every rank): `{r0['kinds']}`; {r0['record']}\n\n" + exchange)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="processes to start (ignored under torchrun)")
    p.add_argument("--model", default="flux", help="a FLUX model of specdiff_zoo.MODELS (flux, flux_64)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--no-inductor", action="store_true", help="run the rewritten graphs without Inductor")
    p.add_argument("--repeat", type=int, default=3, help="timed generations per run (the median is reported)")
    p.add_argument("--tiny", action="store_true", help="CI smoke mode: 8 steps, 1 prompt, no Inductor")
    p.add_argument("--write", action="store_true", help="also write benchmarks/context_parallel.md")
    a = p.parse_args(argv)
    from benchmarks.protocol import PROMPTS

    opts = {"model": a.model, "steps": 8 if a.tiny else a.steps, "prompts": PROMPTS[:1 if a.tiny else a.prompts],
            "device": a.device, "inductor": not (a.no_inductor or a.tiny), "warm": not a.tiny,
            "repeat": 1 if a.tiny else a.repeat}
    if "LOCAL_RANK" in os.environ:  # under torchrun: this process is one rank
        import torch.distributed as dist

        dist.init_process_group("nccl" if a.device == "cuda" else "gloo")
        mine = worker(dist.get_rank(), dist.get_world_size(), opts)
        results: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(results, mine)
        dist.destroy_process_group()
        if mine["rank"] != 0:
            return
    else:
        results = spawn(a.world, worker, opts, backend="nccl" if a.device == "cuda" else "gloo")
    text = (f"Command: `python benchmarks/context_parallel.py{' ' + ' '.join(argv or sys.argv[1:])}`; model "
            f"{opts['model']}, {opts['steps']} steps, {len(opts['prompts'])} prompt(s), FLUX sampling without CFG; "
            f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
            f"{'Inductor' if opts['inductor'] else 'no Inductor'}\n\n" + table(results))
    print(text)
    if a.write:
        (ROOT / "benchmarks" / "context_parallel.md").write_text(text + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
