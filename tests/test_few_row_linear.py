"""The ``few_row_linear`` pass and its op: which linears a cached variant computes as ``W x^T``
on a CPU (real Dynamo graphs of tiny SD3 and FLUX), and that their values do not change."""

import functools
import importlib

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from specdiff_fx import SpecDiffConfig, analyze_dit, build_variant
from specdiff_fx.graph_utils import clone_graph_module
from specdiff_fx.passes import (
    RewriteContext,
    attend_with_kv_cache,
    expose_token_output,
    few_row_linear,
    finalize_outputs,
    gather_token_subset,
    passes_for,
    run_passes,
)
from specdiff_fx.passes.context import seed_placeholder_values
from specdiff_fx.signature import ContextMode, Role, VariantKey

rule = importlib.import_module("specdiff_fx.passes.few_row_linear")
OP = torch.ops.specdiff.few_row_linear.default
MEASURED = rule.left_operand_faster  # the host's rule, before the fixture below stands in for it
CFG = SpecDiffConfig(inductor=False, score_queries=0, kv_extrapolation=False)
SPARSE = [gather_token_subset, attend_with_kv_cache, expose_token_output]


@pytest.fixture(autouse=True)
def op_faster(monkeypatch):
    """The rule's structure, independent of this host's BLAS: the host's measurement says the op
    is faster (its own tests below patch the timings instead)."""
    monkeypatch.setattr(rule, "left_operand_faster", lambda *shape: True)


def sparse_graph(c, with_pass: bool):
    plan = analyze_dit(c.gm)
    gm = clone_graph_module(c.gm)
    ctx = RewriteContext(plan=plan, config=CFG, key=VariantKey.sparse(5, ContextMode.COMPUTE, False))
    seed_placeholder_values(gm, c.example_inputs, ctx)
    passes = SPARSE + ([few_row_linear] if with_pass else []) + [finalize_outputs]
    return run_passes(gm, passes, ctx), ctx, plan


def per_sample_linears(model: torch.nn.Module) -> int:
    """The model's linears that take one row per sample: the embedders of the timestep, the
    guidance and the pooled text, and every modulation (adaLN) linear."""
    return sum(1 for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and ("time_text_embed" in name or (name.count(".") and name.split(".")[-2].startswith("norm"))))


def count(gm, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def sparse_args(c, ctx, plan, seed=0):
    g = torch.Generator().manual_seed(seed)
    extra = []
    for i in ctx.new_inputs:
        if i.port.role is Role.IDX:
            extra.append(torch.stack([torch.randperm(plan.num_image_tokens, generator=g)[:5].sort().values for _ in range(2)]))
        else:
            extra.append(torch.randn(i.shape, generator=g).to(i.dtype))  # the caches: bfloat16 (kv_dtype="auto")
    return [*c.example_inputs, *extra]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_per_sample_linears_of_a_sparse_graph_become_the_op(captured, monkeypatch, name):
    """With the weight-size floor lifted (the tiny models' weights are a few KiB), exactly the
    per-sample linears (2 rows at batch 2) are rewritten, every token linear (>= 24 rows) stays,
    and the sparse graph's outputs do not change."""
    c = captured(name)
    before, ctx0, plan = sparse_graph(c, with_pass=False)
    assert count(before, OP) == 0
    monkeypatch.setattr(rule, "MIN_WEIGHT_BYTES", 0)
    after, ctx, _ = sparse_graph(c, with_pass=True)
    expected = per_sample_linears(c.model)
    assert expected >= 10
    assert count(after, OP) == expected
    assert count(after, torch._C._nn.linear) == count(before, torch._C._nn.linear) - expected
    for n in after.graph.find_nodes(op="call_function", target=torch._C._nn.linear):
        x = n.args[0].meta["val"]
        assert x.numel() // x.shape[-1] > rule.MAX_ROWS
    args = sparse_args(c, ctx, plan)
    with torch.no_grad():
        want = before(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        got = after(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_small_weights_and_the_full_variant_keep_their_linears(captured, name):
    """At the default floor (1.5 MiB) no linear of a tiny model is rewritten; the full variant's
    pass list has no rewrite at all (it keeps Inductor's own code), nor the skip variant's (it runs
    no block and no embedder: nothing but the blend of the history and the unpatchify)."""
    c = captured(name)
    gm, _, _ = sparse_graph(c, with_pass=True)
    assert count(gm, OP) == 0
    assert few_row_linear not in passes_for(VariantKey.full(), CFG)
    assert few_row_linear not in passes_for(VariantKey.skip(), CFG)
    assert few_row_linear in passes_for(VariantKey.sparse(5, ContextMode.COMPUTE, False), CFG)


def _linear_graph(x: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype | None = None) -> fx.GraphModule:
    gm = fx.symbolic_trace(lambda x, w: F.linear(x, w, None))
    (px, pw) = gm.graph.find_nodes(op="placeholder")
    px.meta["val"], pw.meta["val"] = x, w
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    node.meta["val"] = torch.empty((*x.shape[:-1], w.shape[0]), dtype=out_dtype or x.dtype, device=x.device)
    return gm


@pytest.mark.parametrize("case, rewritten", [
    ("rows 1", True), ("rows 8", True), ("rows 9", False), ("3-d, rows 2x4", True), ("float64", False),
    ("another device", False), ("small weight", False), ("autocast", False),
])
def test_the_rule(case, rewritten):
    """Only float32 on a CPU, at most MAX_ROWS rows, a weight of at least MIN_WEIGHT_BYTES; not
    a float32 linear whose output autocast makes bfloat16."""
    big = (1536, 256)  # 1.5 MiB in float32
    x, w = {
        "rows 1": (torch.empty(1, 256), torch.empty(big)),
        "rows 8": (torch.empty(8, 256), torch.empty(big)),
        "rows 9": (torch.empty(9, 256), torch.empty(big)),
        "3-d, rows 2x4": (torch.empty(2, 4, 256), torch.empty(big)),
        "float64": (torch.empty(2, 256, dtype=torch.float64), torch.empty(big, dtype=torch.float64)),
        "another device": (torch.empty(2, 256, device="meta"), torch.empty(big, device="meta")),
        "small weight": (torch.empty(2, 256), torch.empty(1024, 256)),
        "autocast": (torch.empty(2, 256), torch.empty(big)),
    }[case]
    gm = _linear_graph(x, w, torch.bfloat16 if case == "autocast" else None)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert rule.rewrites(node) is rewritten
    few_row_linear(gm, None)
    assert (node.target is OP) is rewritten


@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (5, 64), (2, 3, 64), (1, 1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_op_is_a_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(shape, generator=g), torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    got = OP(x, w, b)
    assert got.shape == (*shape[:-1], 96) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.library.opcheck(OP, (x, w, b), test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("regional", [False, True])
def test_inductor_compiles_a_variant_with_the_op(captured, monkeypatch, regional):
    """The sparse variant of tiny SD3 with its per-sample linears as the op, compiled by
    Inductor as one graph and block by block: the op lowers as an opaque call and gives the
    plain graph's outputs."""
    monkeypatch.setattr(rule, "MIN_WEIGHT_BYTES", 0)
    c = captured("sd3")
    plan = analyze_dit(c.gm)
    key = VariantKey.sparse(5, ContextMode.COMPUTE, True)
    compiled = build_variant(c.gm, c.example_inputs, plan, SpecDiffConfig(regional_compile=regional), key)
    plain = build_variant(c.gm, c.example_inputs, plan, SpecDiffConfig(inductor=False), key, passes=[
        p for p in passes_for(key, CFG) if p is not few_row_linear])
    assert count(compiled.gm, OP) == per_sample_linears(c.model)
    args = sparse_args(c, compiled, plan)
    with torch.no_grad():
        got = compiled(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
        want = plain(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("timings, faster", [((2.0, 1.0), True), ((1.0, 0.85), True), ((1.0, 0.9), False),
                                             ((1.0, 3.4), False)])
def test_the_host_decides(monkeypatch, timings, faster):
    """A node the rule admits is rewritten only where the op timed clearly faster on this host
    (at most MARGIN of F.linear's time), measured once per shape and thread count."""
    calls = []
    monkeypatch.setattr(rule, "left_operand_faster", functools.lru_cache(MEASURED.__wrapped__))
    monkeypatch.setattr(rule, "_time_forms", lambda *shape: calls.append(shape) or timings)
    x, w = torch.empty(2, 256), torch.empty(1536, 256)
    for _ in range(2):
        gm = _linear_graph(x, w)
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        assert rule.rewrites(node) is faster
        few_row_linear(gm, None)
        assert (node.target is OP) is faster
    assert calls == [(2, 1536, 256)]


def test_time_forms_times_both(monkeypatch):
    """Real products, also where the caller traces under a fake tensor mode (a fake product
    would take no time and decide nothing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    linear, op = rule._time_forms(2, 96, 64)
    assert 0 < linear < 1 and 0 < op < 1
    seen, real = [], F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b: seen.append(type(w)) or real(x, w, b))
    with FakeTensorMode():
        rule._time_forms(2, 96, 64)
    assert seen and all(t is torch.Tensor for t in seen)
