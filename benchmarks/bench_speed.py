"""pytest-benchmark suite: one denoising step and one 28-step generation, eager vs Inductor vs
specdiff, on the "mid" SD3-architecture config and on the shipped trained model.

Not part of the test run (the file name does not match ``test_*.py``); run it with

    bash scripts/bench.sh            # = pytest benchmarks/bench_speed.py --benchmark-group-by=group
    SPECDIFF_BENCH_OPTIONS='{"tolerance": 0.2}' bash scripts/bench.sh -k mid_generation

``SPECDIFF_BENCH_OPTIONS`` (JSON) passes specdiff options to the generations' backend (the
``context`` modes add theirs); ``SPECDIFF_BENCH_ROUNDS`` and ``SPECDIFF_BENCH_STEPS`` set the
rounds and the step count.

Results are grouped so ``pytest-benchmark compare`` shows the three side by side. A specdiff
"step" is a *cached* step (the sparse variant at the default cache ratio); its full steps cost
what the ``full`` variant costs, shown separately.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

import specdiff_fx
from benchmarks.configs import euler_generate, mid_inputs, mid_sd3
from specdiff_fx import SpecDiffConfig, analyze_dit, build_variant
from specdiff_fx.signature import VariantKey

ROUNDS = int(os.environ.get("SPECDIFF_BENCH_ROUNDS", "3"))
STEPS = int(os.environ.get("SPECDIFF_BENCH_STEPS", "28"))
OPTIONS = json.loads(os.environ.get("SPECDIFF_BENCH_OPTIONS", "{}"))


@pytest.fixture(scope="module")
def mid():
    torch.manual_seed(0)
    return mid_sd3(), mid_inputs()


@pytest.fixture(scope="module")
def mid_graph(mid):
    model, inputs = mid
    store = {}

    def grab(gm, ex):
        store["gm"], store["ex"] = gm, list(ex)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab, dynamic=False)(**inputs)
    return store["gm"], store["ex"], analyze_dit(store["gm"])


def _compiled(model, mode):
    torch._dynamo.reset()
    if mode == "eager":
        return model
    if mode == "inductor":
        return torch.compile(model)
    if mode == "specdiff_context_cached":  # no context token computed on cached steps (BENCHMARKS.md)
        return torch.compile(model, backend="specdiff", options={**OPTIONS, "context_ratio": 1.0})
    if mode == "specdiff_context_computed":  # every context token computed on cached steps
        return torch.compile(model, backend="specdiff", options={**OPTIONS, "context_ratio": 0.0})
    return torch.compile(model, backend="specdiff", options=OPTIONS or None)


@pytest.mark.parametrize("mode", ["eager", "inductor", "specdiff_full", "specdiff_cached"])
def test_mid_step(benchmark, mid, mid_graph, mode):
    benchmark.group = "mid: one denoising step"
    model, inputs = mid
    gm, ex, plan = mid_graph
    with torch.no_grad():
        if mode in ("eager", "inductor"):
            fn = _compiled(model, mode)
            call = lambda: fn(**inputs)  # noqa: E731
        else:
            cfg = SpecDiffConfig()
            if mode == "specdiff_full":
                v = build_variant(gm, ex, plan, cfg, VariantKey.full())
                call = lambda: v(*ex)  # noqa: E731
            else:
                k = cfg.num_computed(plan.num_image_tokens)
                v = build_variant(gm, ex, plan, cfg, VariantKey.sparse(k))
                g = torch.Generator().manual_seed(0)
                idx = torch.stack([torch.randperm(plan.num_image_tokens, generator=g)[:k].sort().values
                                   for _ in range(plan.batch)])
                extra = [torch.zeros(i.shape, dtype=i.dtype) for i in v.new_inputs[1:]]
                call = lambda: v(*ex, idx, *extra)  # noqa: E731
        call()
        benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["eager", "inductor", "specdiff", "specdiff_context_cached",
                                  "specdiff_context_computed"])
def test_mid_generation(benchmark, mid, mode):
    benchmark.group = f"mid: {STEPS}-step generation"
    model, inputs = mid
    fn = _compiled(model, mode)
    with torch.no_grad():
        benchmark.pedantic(lambda: euler_generate(fn, inputs, STEPS), rounds=ROUNDS, warmup_rounds=1)
    if mode.startswith("specdiff"):
        benchmark.extra_info["flops_fraction"] = specdiff_fx.last_generation().flops_fraction


@pytest.mark.parametrize("mode", ["eager", "inductor", "specdiff"])
def test_trained_generation(benchmark, mode):
    from specdiff_zoo.demo import PROMPTS
    from specdiff_zoo import load_shapes_dit

    benchmark.group = f"trained shapes model: {STEPS}-step generation"
    model = load_shapes_dit("sd3")
    fn = _compiled(model.transformer, mode)
    with torch.no_grad():
        benchmark.pedantic(lambda: model.sample(PROMPTS, num_steps=STEPS, seed=0, transformer=fn),
                           rounds=ROUNDS, warmup_rounds=1)
