"""Where a specdiff generation's wall clock goes: its calls timed one by one, by kind.

``python benchmarks/time_breakdown.py [--model sd3_b | --config deep] [--steps 28] [--repeats 3] [--threads 2]``
generates the 8 prompts of the evaluation protocol (seed 0, the model family's first sampler:
SD3 with batched CFG, FLUX with true CFG) with eager, with Inductor and with
``backend="specdiff"`` (defaults, or ``--specdiff JSON``), side by side, ``--repeats`` rounds after
a warm-up round. Each call of the specdiff-compiled transformer is timed on its own and matched to
the generation's report, call by call, so the generation's time splits into its full calls, its
sparse calls (``cached``: some tokens computed) and its skipped calls (no token computed), and
the rest (the sampler, the text encoder, the scheduler). The plain Inductor graph's call is timed
the same way: a full call's time against it is what the full variant and the runtime add.

It prints, per round, the three generations' seconds and the ratios, and per kind the number of
calls, their total seconds, their share of the specdiff generation and the median call in ms; then,
over all timed rounds, each kind's median call split into the time inside the compiled variant
(Inductor's code, ``Variant.call``), the runtime's call routing (``Router.route``) and the rest
of what the call costs outside the graph (Dynamo's guards, the controller, token choice, caches,
telemetry). On CPU the calls are synchronous, so a call's wall clock is its cost; on a GPU this
script would need a synchronize per call (not done: it runs on CPU).

To compare the runtime of another commit, run this file from a checkout of it (``git worktree add
DIR COMMIT; cp benchmarks/time_breakdown.py DIR/benchmarks/``, then the same command in ``DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import specdiff_fx  # noqa: E402
import specdiff_zoo  # noqa: E402
from benchmarks import protocol  # noqa: E402

KINDS = ("full", "cached", "skipped")


class TimedCalls:
    """Wraps a transformer; times every call (``perf_counter``, CPU: synchronous). Attribute
    access (``config``, ``cache_context``, ...) goes to the wrapped module. With ``parts``, each
    call's time inside the compiled variants and in call routing as well (:func:`timing_parts`)."""

    def __init__(self, inner: Any, parts: dict[str, float] | None = None) -> None:
        self.inner = inner
        self.seconds: list[float] = []
        self.parts = parts
        self.split: list[tuple[float, float]] = []  # per call: (in the graph, in routing)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.parts is not None:
            self.parts.update(graph=0.0, route=0.0)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.seconds.append(time.perf_counter() - t0)
        if self.parts is not None:
            self.split.append((self.parts["graph"], self.parts["route"]))
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@contextlib.contextmanager
def timing_parts() -> Iterator[dict[str, float]]:
    """While open, every compiled variant's call (``Variant.call``) and every routing
    (``Router.route``) adds its seconds to the yielded dict's ``"graph"`` / ``"route"``; the
    methods are restored on exit."""
    from specdiff_fx.runtime.routing import Router
    from specdiff_fx.variants import Variant

    acc = {"graph": 0.0, "route": 0.0}
    saved = Variant.call, Router.route

    def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[key] += time.perf_counter() - t0
        return wrapper

    Variant.call, Router.route = timed(saved[0], "graph"), timed(saved[1], "route")
    try:
        yield acc
    finally:
        Variant.call, Router.route = saved


def split_by_kind(seconds: Sequence[Any], report: Any) -> dict[str, list[Any]]:
    """The calls' seconds (or any per-call values, in call order) grouped by the kind the report
    gives each call (its main-run records, in call order). Raises ``ValueError`` if the counts
    differ (a speculative pre-run's internal calls are not calls of the pipeline and are not in
    ``seconds``)."""
    steps = report.main_steps
    if len(steps) != len(seconds):
        raise ValueError(f"{len(seconds)} timed calls but {len(steps)} main-run records in the report")
    out: dict[str, list[Any]] = {k: [] for k in KINDS}
    for rec, s in zip(steps, seconds):
        out.setdefault(rec.kind, []).append(s)
    return out


def generation_setup(model_name: str, prompts: int) -> tuple[Any, str, Callable[..., Any], Sequence[str], torch.Tensor]:
    """The trained model ``model_name``, its family's first sampler (name and function), the
    protocol's first ``prompts`` prompts and their seed-0 noise: one generation as the
    protocol samples it."""
    model = specdiff_zoo.load_shapes_dit(model_name)
    sampler = protocol.SAMPLERS_BY_FAMILY[model.family][0]
    texts = protocol.PROMPTS[:prompts]
    noise = protocol.initial_noise(protocol.SEEDS[0], protocol.image_size(model), len(texts))
    return model, sampler, protocol.SAMPLERS[sampler], texts, noise


def measure(model_name: str = "sd3_b", steps: int = 28, prompts: int = 8, repeats: int = 3,
            options: dict | None = None, inductor: bool = True,
            log: Callable[[str], None] = print, skip_module_guards: bool = False) -> dict:
    """Runs the comparison; returns the rounds and the per-kind totals (also printed)."""
    model, sampler, sample, texts, noise = generation_setup(model_name, prompts)
    out = _compare(model.transformer, lambda fn: sample(model, fn, texts, noise, steps), repeats, options,
                   inductor, log, skip_module_guards)
    return {"model": model_name, "sampler": sampler, "steps": steps, "prompts": len(texts),
            "threads": torch.get_num_threads(), "options": options or {}, **out}


def measure_config(config: str, steps: int = 28, repeats: int = 3, options: dict | None = None,
                   inductor: bool = True, log: Callable[[str], None] = print,
                   skip_module_guards: bool = False) -> dict:
    """:func:`measure` on one of ``compile_time.py``'s random-weight workloads instead of a zoo
    model (``deep``: the tiny SD3 at SD3-medium's 24 layers, one prompt, batched CFG; ``tiny``,
    ``mid``, ``flux_deep``): the host's share of a call grows with the number of blocks."""
    from benchmarks import compile_time

    transformer, generate = compile_time.workload(config, None, steps)
    out = _compare(transformer, generate, repeats, options, inductor, log, skip_module_guards)
    return {"config": config, "steps": steps, "threads": torch.get_num_threads(), "options": options or {}, **out}


def _compare(eager: Any, generate: Callable[[Any], Any], repeats: int, options: dict | None, inductor: bool,
             log: Callable[[str], None], skip_module_guards: bool = False) -> dict:
    """``eager``, its plain Inductor compile and its specdiff compile side by side, each generation
    made by ``generate(transformer)``: :func:`_rounds` with the calls timed. ``skip_module_guards``:
    both compiles without Dynamo's guards on the modules' attributes and parameters
    (``guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe``)."""
    torch._dynamo.reset()
    guards = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe} if skip_module_guards else {}
    plain = TimedCalls(torch.compile(copy.deepcopy(eager), options=dict(guards) or None) if inductor
                       else copy.deepcopy(eager))
    with timing_parts() as parts:
        spec = TimedCalls(torch.compile(copy.deepcopy(eager), backend="specdiff",
                                        options={**(options or {}), "inductor": inductor, **guards}), parts)
        return _rounds(generate, repeats, eager, plain, spec, log)


def _rounds(generate: Callable[[Any], Any], repeats: int, eager: Any, plain: TimedCalls, spec: TimedCalls,
            log: Callable[[str], None]) -> dict:

    def gen(transformer: Any) -> float:
        if transformer is spec:
            specdiff_fx.reset()
        return protocol._clock(lambda: generate(transformer))

    rounds = []
    per_call: dict[str, list[tuple[float, float, float]]] = {k: [] for k in KINDS}  # (call, graph, routing)
    with torch.no_grad():
        for r in range(repeats + 1):  # round 0 warms up (compiles)
            plain.seconds.clear()
            spec.seconds.clear()
            spec.split.clear()
            te, ti, ts = gen(eager), gen(plain), gen(spec)
            report = specdiff_fx.last_generation()
            calls = split_by_kind([(s, g, rt) for s, (g, rt) in zip(spec.seconds, spec.split)], report)
            kinds = {k: [c[0] for c in v] for k, v in calls.items()}
            row = {"eager": te, "inductor": ti, "specdiff": ts, "inductor_call_ms": 1e3 * statistics.median(plain.seconds),
                   "kinds": {k: {"calls": len(v), "seconds": sum(v),
                                 "median_ms": 1e3 * statistics.median(v) if v else float("nan")}
                             for k, v in kinds.items()},
                   "flops": report.flops_fraction}
            if r == 0:
                log(f"warm-up round (compiles): eager {te:.2f} s, inductor {ti:.2f} s, specdiff {ts:.2f} s")
                continue
            rounds.append(row)
            for k, v in calls.items():
                per_call.setdefault(k, []).extend(v)
            in_calls = sum(row["kinds"][k]["seconds"] for k in row["kinds"])
            by_kind = ", ".join(f"{k} {v['calls']} x {v['median_ms']:.1f} ms = {v['seconds']:.3f} s "
                                f"({v['seconds'] / ts:.0%})" for k, v in row["kinds"].items())
            log(f"round {r}: eager {te:.3f} s, inductor {ti:.3f} s, specdiff {ts:.3f} s "
                f"({te / ts:.2f}x eager, {ti / ts:.2f}x inductor; FLOPs {row['flops']:.1%}); "
                f"specdiff calls: {by_kind}; outside the calls {ts - in_calls:.3f} s; "
                f"plain Inductor call {row['inductor_call_ms']:.1f} ms")
    split = {k: call_split(v) for k, v in per_call.items() if v}
    for k, v in split.items():
        log(f"{k} calls ({v['calls']} over the timed rounds), medians: {v['call_ms']:.2f} ms a call, "
            f"{v['graph_ms']:.2f} in the compiled variant, {v['outside_ms']:.2f} outside it, "
            f"of which routing {v['routing_ms']:.2f}")
    return {"rounds": rounds, "split": split}


def call_split(calls: Sequence[tuple[float, float, float]]) -> dict:
    """Medians over ``(call, graph, routing)`` seconds: the call, the time inside the compiled
    variant, the time outside it (each call's difference) and in routing, in ms."""
    med = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    return {"calls": len(calls), "call_ms": med([c for c, _, _ in calls]), "graph_ms": med([g for _, g, _ in calls]),
            "outside_ms": med([c - g for c, g, _ in calls]), "routing_ms": med([r for _, _, r in calls])}


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="sd3_b", help="a zoo model (default sd3_b, held out)")
    p.add_argument("--config", choices=["tiny", "mid", "deep", "flux_deep"],
                   help="a random-weight workload of compile_time.py instead of --model")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--specdiff", type=json.loads, default={}, metavar="JSON", help="specdiff options")
    p.add_argument("--no-inductor", action="store_true", help="plain FX instead of Inductor (smoke runs)")
    p.add_argument("--skip-module-guards", action="store_true",
                   help="both compiles with guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.config:
        return measure_config(a.config, a.steps, a.repeats, a.specdiff, inductor=not a.no_inductor,
                              skip_module_guards=a.skip_module_guards)
    return measure(a.model, a.steps, a.prompts, a.repeats, a.specdiff, inductor=not a.no_inductor,
                   skip_module_guards=a.skip_module_guards)


if __name__ == "__main__":
    main()
