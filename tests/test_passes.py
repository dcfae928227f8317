"""Each pass on real Dynamo graphs of tiny SD3 and FLUX: structure and numerics.

The numerics are checked against the independent eager oracle in ``oracle.py``.
"""

from collections import Counter

import pytest
import torch

from specdiff_fx import SpecDiffConfig, analyze_dit, ops
from specdiff_fx.graph_utils import clone_graph_module
from specdiff_fx.layout import sdpa_args
from specdiff_fx.passes import (
    RewriteContext,
    attend_with_kv_cache,
    blend_token_history,
    expose_attention_kv,
    expose_attention_score,
    expose_token_output,
    finalize_outputs,
    gather_token_subset,
    run_passes,
    skip_token_stream,
)
from specdiff_fx.passes.context import seed_placeholder_values
from specdiff_fx.signature import ContextMode, VariantKey

CFG = SpecDiffConfig(inductor=False, score_queries=0, kv_extrapolation=False, kv_dtype="model")
MODELS = ["sd3", "flux"]


def apply(c, passes, variant="full", k=None, config=CFG, context=None):
    """Run ``passes`` on a clone of ``c``'s graph for the variant ``variant`` (``k`` tokens);
    ``context`` defaults to what the runtime's full variant does (text K/V returned) and to
    computing the context in a sparse one."""
    plan = analyze_dit(c.gm)
    gm = clone_graph_module(c.gm)
    if variant == "full":
        key = VariantKey.full(refresh_text=context is not ContextMode.COMPUTE)
    elif variant == "skip":
        key = VariantKey.skip()
    else:
        key = VariantKey.sparse(k, context or ContextMode.COMPUTE, config.kv_extrapolation)
    ctx = RewriteContext(plan=plan, config=config, key=key)
    seed_placeholder_values(gm, c.example_inputs, ctx)
    gm = run_passes(gm, passes, ctx)
    return gm, ctx, plan


def targets(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def run(gm, ctx, args):
    with torch.no_grad():
        out = gm(*args)
    n_user = gm.meta["specdiff_outputs"]["user"]
    return out[:n_user], dict(zip(gm.meta["specdiff_outputs"]["extras"], out[n_user:]))


@pytest.mark.parametrize("name", MODELS)
def test_runner_keeps_meta_val_true(captured, name):
    gm, ctx, _ = apply(captured(name), [expose_token_output, finalize_outputs])
    for node in gm.graph.nodes:
        if node.op not in ("output",):
            assert "val" in node.meta, node.name


@pytest.mark.parametrize("name", MODELS)
def test_expose_attention_kv(captured, reference, name):
    c = captured(name)
    gm, ctx, plan = apply(c, [expose_attention_kv, finalize_outputs])  # the full variant: text K/V too
    n_attn = len(plan.attention)
    assert targets(gm)[ops.image_segment] == targets(gm)[ops.text_segment] == 2 * n_attn
    assert gm.meta["specdiff_outputs"]["extras"] == tuple(
        f"{c}{t}{i}" for i in range(n_attn) for t in ("", "t") for c in "kv")
    user, extras = run(gm, ctx, c.example_inputs)
    assert torch.allclose(user[0], c.model(**c.inputs).sample, atol=1e-6)
    ref = reference(name)
    for i, ((k, v), (kt, vt)) in enumerate(zip(ref.kv, ref.text_kv, strict=True)):
        assert extras[f"k{i}"].shape == (2, 2, plan.num_image_tokens, 8)
        torch.testing.assert_close(extras[f"k{i}"], k, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(extras[f"v{i}"], v, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(extras[f"kt{i}"], kt, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(extras[f"vt{i}"], vt, atol=1e-5, rtol=1e-4)
    gm, _, _ = apply(c, [expose_attention_kv, finalize_outputs], context=ContextMode.COMPUTE)
    assert gm.meta["specdiff_outputs"]["extras"] == tuple(f"{c}{i}" for i in range(n_attn) for c in "kv")


@pytest.mark.parametrize("name", MODELS)
def test_expose_attention_score(captured, reference, name):
    c = captured(name)
    gm, ctx, plan = apply(c, [expose_attention_score, finalize_outputs])
    n_attn = len(plan.attention)
    t = targets(gm)
    assert t[ops.received_attention] == n_attn
    _, extras = run(gm, ctx, c.example_inputs)
    assert extras["score"].shape == (2, plan.num_image_tokens)
    torch.testing.assert_close(extras["score"], reference(name).score, atol=1e-4, rtol=1e-4)
    # sampling query rows: an estimate that tracks the exact score
    gm2, ctx2, _ = apply(c, [expose_attention_score, finalize_outputs], config=CFG.replace(score_queries=8))
    _, sampled = run(gm2, ctx2, c.example_inputs)
    exact = extras["score"]
    corr = torch.corrcoef(torch.stack([sampled["score"].flatten(), exact.flatten()]))[0, 1]
    assert corr > 0.5 and not torch.allclose(sampled["score"], exact)


@pytest.mark.parametrize("name", MODELS)
def test_expose_token_output(captured, reference, name):
    c = captured(name)
    gm, ctx, plan = apply(c, [expose_token_output, finalize_outputs])
    _, extras = run(gm, ctx, c.example_inputs)
    assert extras["tokens"].shape == (2, plan.num_image_tokens, plan.out_channels)
    torch.testing.assert_close(extras["tokens"], reference(name).out_tokens, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_skip_token_stream(captured, reference, name):
    """The skip variant: no attention and no block left, only the blend of the history and
    the model's own epilogue; with the history holding the full step's per-token outputs it
    returns the full step's output."""
    c = captured(name)
    plan = analyze_dit(c.gm)
    n, h = plan.num_image_tokens, CFG.history_depth
    gm, ctx, _ = apply(c, [skip_token_stream, finalize_outputs], variant="skip")
    names = [p.name for p in gm.graph.find_nodes(op="placeholder")][len(c.example_inputs):]
    assert names == ["specdiff_history", "specdiff_weights"]
    t = targets(gm)
    assert t[ops.tier_blend] == 1
    assert set(t) <= {ops.tier_blend, torch.einsum}  # the rest is the epilogue's views (SD3's unpatchify einsum)
    ref = reference(name)
    history = torch.stack([ref.out_tokens, torch.randn_like(ref.out_tokens)])
    weights = torch.zeros(2, n, h)
    weights[..., 0] = 1.0
    user, extras = run(gm, ctx, [*c.example_inputs, history, weights])
    torch.testing.assert_close(extras["tokens"], ref.out_tokens)
    with torch.no_grad():
        torch.testing.assert_close(user[0], c.model(**c.inputs).sample, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_gather_token_subset(captured, reference, name):
    c = captured(name)
    plan = analyze_dit(c.gm)
    n = plan.num_image_tokens
    gm, ctx, _ = apply(c, [gather_token_subset, expose_token_output, finalize_outputs], variant="sparse", k=n)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    assert [p.name for p in placeholders[len(c.example_inputs):]] == ["specdiff_idx", "specdiff_base"]
    t = targets(gm)
    assert t[ops.take_tokens] == 1 + len(plan.side_inputs)
    assert t[ops.scatter_tokens] == 1
    assert t[ops.layout_index] == (1 if name == "flux" else 0)  # FLUX: one (txt, img) index for RoPE
    # with every token kept (any order) the subset graph is the full graph, permuted
    perm = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(b)) for b in range(2)])
    base = torch.zeros(2, n, plan.out_channels)
    user, extras = run(gm, ctx, [*c.example_inputs, perm, base])
    full = reference(name).out_tokens
    torch.testing.assert_close(extras["subset"], torch.gather(full, 1, perm[..., None].expand(-1, -1, full.shape[2])),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(extras["tokens"], full, atol=1e-5, rtol=1e-4)  # scattered back in place
    with torch.no_grad():
        torch.testing.assert_close(user[0], c.model(**c.inputs).sample, atol=1e-5, rtol=1e-4)
    # a smaller k: the subset is [B, 3, C], the stream is [B, N, C] again after the scatter
    gm3, _, _ = apply(c, [gather_token_subset, expose_token_output, finalize_outputs], variant="sparse", k=3)
    outs = gm3.graph.output_node().args[0]
    assert tuple(outs[-1].meta["val"].shape) == (2, 3, plan.out_channels)
    assert tuple(outs[-2].meta["val"].shape) == (2, n, plan.out_channels)
    assert tuple(outs[0].meta["val"].shape) == tuple(user[0].shape)


@pytest.mark.parametrize("name", MODELS)
def test_blend_token_history(captured, reference, name):
    c = captured(name)
    plan = analyze_dit(c.gm)
    n, k, h = plan.num_image_tokens, 4, CFG.history_depth
    assert h == 2  # no paper blend: each token's last two computed outputs
    gm, ctx, _ = apply(c, [gather_token_subset, blend_token_history, expose_token_output, finalize_outputs],
                       variant="sparse", k=k)
    names = [p.name for p in gm.graph.find_nodes(op="placeholder")][len(c.example_inputs):]
    assert names == ["specdiff_idx", "specdiff_history", "specdiff_weights"]
    assert targets(gm)[ops.tier_blend] == 1
    g = torch.Generator().manual_seed(0)
    history = torch.randn(h, 2, n, plan.out_channels, generator=g)
    weights = torch.softmax(torch.randn(2, n, h, generator=g), dim=-1)
    idx = torch.tensor([[0, 1, 2, 3], [5, 9, 13, 23]])
    _, extras = run(gm, ctx, [*c.example_inputs, idx, history, weights])
    expected = torch.einsum("hbnc,bnh->bnc", history, weights)
    expected.scatter_(1, idx[..., None].expand(-1, -1, plan.out_channels), extras["subset"])
    torch.testing.assert_close(extras["tokens"], expected)


@pytest.mark.parametrize("depth", [2, 3])
def test_tier_blend_is_elementwise(depth):
    """The blend the reuse and blend tiers read traces to products and sums only, no matrix
    product: as a batched product over the history axis Inductor's CPU code made it a
    reduction with an OpenMP region per token row (6.4 ms of a 20.6 ms cached call on
    ``sd3_b``). Its values are the weighted sum, a one-hot row the newest output exactly."""
    from torch.fx.experimental.proxy_tensor import make_fx

    g = torch.Generator().manual_seed(0)
    history = torch.randn(depth, 3, 7, 12, generator=g)
    weights = torch.softmax(torch.randn(3, 7, depth, generator=g), dim=-1)
    traced = make_fx(ops.tier_blend)(history, weights)
    calls = {n.target for n in traced.graph.nodes if n.op == "call_function"}
    assert not calls & {torch.ops.aten.bmm.default, torch.ops.aten.mm.default, torch.ops.aten.sum.dim_IntList}
    assert torch.ops.aten.mul.Tensor in calls
    torch.testing.assert_close(ops.tier_blend(history, weights), torch.einsum("hbnc,bnh->bnc", history, weights))
    one_hot = torch.zeros_like(weights)
    one_hot[..., 0] = 1
    assert torch.equal(ops.tier_blend(history, one_hot), history[0])


@pytest.mark.parametrize("name", MODELS)
def test_attend_with_kv_cache_extrapolation_inputs(captured, name):
    c = captured(name)
    plan = analyze_dit(c.gm)
    gm, ctx, _ = apply(c, [gather_token_subset, attend_with_kv_cache, expose_token_output, finalize_outputs],
                       variant="sparse", k=5, config=CFG.replace(kv_extrapolation=True))
    n_attn = len(plan.attention)
    names = [i.name for i in ctx.new_inputs]
    assert names == ["specdiff_idx", "specdiff_base", "specdiff_kv_ratio"] + [
        f"specdiff_{c}{p}{i}" for i in range(n_attn) for c in "kv" for p in ("", "p")]
    calls = [n for n in gm.graph.nodes if n.target is ops.attend_keys]
    assert len(calls) == 2 * n_attn and all(n.kwargs["prev"].name.startswith("specdiff_") for n in calls)
    assert {n.kwargs["ratio"].name for n in calls} == {"specdiff_kv_ratio"}  # one ratio input shared by all


@pytest.mark.parametrize("name", MODELS)
def test_attend_with_kv_cache(captured, reference, name):
    c = captured(name)
    plan = analyze_dit(c.gm)
    k = 5
    gm, ctx, _ = apply(c, [gather_token_subset, attend_with_kv_cache,
                           expose_token_output, finalize_outputs], variant="sparse", k=k)
    n_attn = len(plan.attention)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    new = [p.name for p in placeholders[len(c.example_inputs):]]
    assert new == ["specdiff_idx", "specdiff_base"] + [f"specdiff_{c}{i}" for i in range(n_attn) for c in "kv"]
    assert [i.shape for i in ctx.new_inputs[2:4]] == [(2, 2, plan.num_image_tokens, 8)] * 2
    assert targets(gm)[ops.attend_keys] == 2 * n_attn
    for node in gm.graph.nodes:
        if node.name in {s.node for s in plan.attention}:
            args = sdpa_args(node)
            assert args["key"].target is ops.attend_keys and args["value"].target is ops.attend_keys
            assert args["query"].target is not ops.attend_keys
    # the caches are updated in place at idx, untouched elsewhere
    ref = reference(name)
    caches = [torch.zeros_like(t) for kv in ref.kv for t in kv]
    idx = torch.tensor([[0, 3, 7, 11, 20], [1, 2, 4, 8, 16]])
    run(gm, ctx, [*c.example_inputs, idx, torch.zeros(2, plan.num_image_tokens, plan.out_channels), *caches])
    mask = torch.zeros(2, plan.num_image_tokens, dtype=torch.bool)
    mask[torch.arange(2)[:, None], idx] = True
    for cache, full in zip(caches, [t for kv in ref.kv for t in kv]):
        assert (cache.transpose(1, 2)[~mask] == 0).all()
        if cache is caches[0]:  # the first attention's keys only depend on the tokens themselves
            torch.testing.assert_close(cache.transpose(1, 2)[mask], full.transpose(1, 2)[mask], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_attend_with_kv_cache_returns_fresh_text_kv_for_context_refresh(captured, reference, name):
    """``ContextMode.REFRESH`` (a cached step that refreshes the text caches): every text
    token is computed and its K/V returned; with exact image caches they equal the full
    step's text K/V."""
    c = captured(name)
    plan = analyze_dit(c.gm)
    passes = [gather_token_subset, attend_with_kv_cache, expose_token_output, finalize_outputs]
    gm, ctx, _ = apply(c, passes, variant="sparse", k=5, context=ContextMode.REFRESH)
    ref = reference(name)
    with_text = [i for i, s in enumerate(plan.attention) if s.layout.length > plan.num_image_tokens]
    assert len(with_text) == len(ref.text_kv) > 0
    assert [p.key for p in ctx.extras] == [f"{ch}t{i}" for i in with_text for ch in "kv"] + ["tokens", "subset"]
    assert targets(gm)[ops.text_segment] == 2 * len(with_text)
    caches = [t.contiguous().clone() for kv in ref.kv for t in kv]
    idx = torch.tensor([[0, 3, 7, 11, 20], [1, 2, 4, 8, 16]])
    _, extras = run(gm, ctx, [*c.example_inputs, idx, torch.zeros(2, plan.num_image_tokens, plan.out_channels),
                              *caches])
    for i, (kt, vt) in zip(with_text, ref.text_kv):
        torch.testing.assert_close(extras[f"kt{i}"], kt, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(extras[f"vt{i}"], vt, atol=1e-5, rtol=1e-4)
    # COMPUTE computes the text too but returns nothing extra
    gm, ctx, _ = apply(c, passes, variant="sparse", k=5, context=ContextMode.COMPUTE)
    assert [p.key for p in ctx.extras] == ["tokens", "subset"]


@pytest.mark.parametrize("name", MODELS)
def test_gather_token_subset_drops_the_text_tokens_with_context_caching(captured, name):
    c = captured(name)
    passes = [gather_token_subset, attend_with_kv_cache, expose_token_output, finalize_outputs]
    gm, ctx, plan = apply(c, passes, variant="sparse", k=5, context=ContextMode.CACHED)
    kept, _, _ = apply(c, passes, variant="sparse", k=5)
    calls = [n for n in gm.graph.nodes if n.target is ops.attend_keys]
    assert len(calls) == 2 * len(plan.attention) and all("text" in n.kwargs for n in calls)
    # the text stream is gone: fewer linear layers, none reading the context embedder
    linears = lambda g: [n for n in g.graph.nodes if n.target is torch._C._nn.linear]  # noqa: E731
    assert len(linears(gm)) < len(linears(kept))
    assert not any("context_embedder" in str(a) for n in linears(gm) for a in n.args)
    for node in gm.graph.nodes:  # every token tensor of the subset graph holds image tokens only
        if node.op == "call_function" and node.target is torch._C._nn.scaled_dot_product_attention:
            q = sdpa_args(node)["query"].meta["val"]
            assert q.shape[-2] == 5
