"""Text tokens as a token subset (``ContextMode.SUBSET``): ``k_txt`` of the ``M`` text tokens
computed per sample (``Role.TEXT_IDX``) through the same layout mechanism as the image
subset; every attention reads all text K/V from per-attention text caches that the computed
text rows write in place (extrapolated per token like the image caches).

Checked on tiny SD3 (image first, a last block whose text output is dropped), SD3.5 (dual
attention) and FLUX (text first, RoPE tables, single-stream blocks carrying [text, image]):
the graph's structure, the all-tokens and no-text edge cases against the full and
context-cached variants, and a real text subset against the eager oracle.
"""

from collections import Counter

import dataclasses

import pytest
import torch

from oracle import sparse_reference
from specdiff_fx import SpecDiffConfig, analyze_dit, build_variant, ops
from specdiff_fx.layout import sdpa_args
from specdiff_fx.signature import ContextMode, Role, VariantKey

CFG = SpecDiffConfig(inductor=False, score_queries=0, score="attention", kv_extrapolation=False,
                     kv_dtype="model")  # caches as computed: the comparisons are exact
TOL = dict(atol=1e-5, rtol=1e-4)
_VARIANTS: dict = {}


def variant(c, k, context=ContextMode.SUBSET, k_txt=None, extrapolate=True):
    key = VariantKey.sparse(k, context, extrapolate, k_txt=k_txt)
    if (c.name, key) not in _VARIANTS:
        _VARIANTS[(c.name, key)] = build_variant(c.gm, c.example_inputs, analyze_dit(c.gm), CFG, key)
    return _VARIANTS[(c.name, key)]


def run(v, c, named, inputs=None):
    """Run ``v`` at the captured inputs (or other ``inputs`` of the same shapes); zero
    history/weights unless given (the tier blend is tested in test_passes). Returns (user
    outputs, extras by short name)."""
    for i in v.new_inputs:
        if i.port.role in (Role.HISTORY, Role.WEIGHTS):
            named.setdefault(i.name, torch.zeros(i.shape, dtype=i.dtype))
    args = c.example_inputs if inputs is None else c.graph_inputs(inputs)
    with torch.no_grad():
        return v.split(v(*args, *v.extra_inputs(named)))


def rows_mask(idx, n):
    """``[B, 1, n, 1]`` bool: the rows ``idx`` of each sample (a cache's token axis)."""
    mask = torch.zeros(idx.shape[0], n, dtype=torch.bool)
    mask[torch.arange(idx.shape[0])[:, None], idx] = True
    return mask[:, None, :, None]


def text_attentions(plan):
    return [i for i, s in enumerate(plan.attention) if s.layout.length > plan.num_image_tokens]


def prev_name(cache):
    """The input holding the computation before ``cache``'s: ``specdiff_k3`` -> ``specdiff_kp3``,
    ``specdiff_kt3`` -> ``specdiff_ktp3``."""
    head = cache.rstrip("0123456789")
    return head + "p" + cache[len(head):]


def kv_inputs(plan, old, now, with_text=True):
    """Image (and text) K/V caches: ``cache`` from the stale step ``old``, ``prev`` from ``now``
    (so the extrapolation is far from both), as contiguous clones by input name."""
    named, t = {}, 0
    for i, (kv_old, kv_now) in enumerate(zip(old.kv, now.kv)):
        for ch, a, b in zip("kv", kv_old, kv_now):
            named[f"specdiff_{ch}{i}"], named[f"specdiff_{ch}p{i}"] = a.contiguous().clone(), b.contiguous().clone()
        if with_text and i in text_attentions(plan):
            for ch, a, b in zip("kv", old.text_kv[t], now.text_kv[t]):
                named[f"specdiff_{ch}t{i}"] = a.contiguous().clone()
                named[f"specdiff_{ch}tp{i}"] = b.contiguous().clone()
            t += 1
    return named


# -- structure ------------------------------------------------------------------------------


def _linear_lengths(gm):
    """Token-axis length (dim 1) of every 3-d linear output: the tokens each projection runs on."""
    return Counter(n.meta["val"].shape[1] for n in gm.graph.nodes
                   if n.target is torch._C._nn.linear and n.meta["val"].dim() == 3)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_subset_graph_structure(captured, name):
    c = captured(name)
    plan = analyze_dit(c.gm)
    n, m, k, k_txt = plan.num_image_tokens, plan.num_text_tokens, 7, 3
    assert (n, m) == (24, 5) and plan.text_subset_error is None
    v = variant(c, k, k_txt=k_txt, extrapolate=False)
    names = [i.name for i in v.new_inputs]
    with_text = text_attentions(plan)
    assert names[:2] == ["specdiff_idx", "specdiff_idx_txt"] and v.new_inputs[1].shape == (2, k_txt)
    assert [x for x in names if x.startswith("specdiff_kt") or x.startswith("specdiff_vt")] == [
        f"specdiff_{ch}t{i}" for i in with_text for ch in "kv"]
    assert all(i.in_place for i in v.new_inputs if i.port.role is Role.TEXT_KV)  # written at the text index
    gm = v.gm
    text_idx = next(p for p in gm.graph.find_nodes(op="placeholder") if p.name == "specdiff_idx_txt")
    takes = [x for x in gm.graph.nodes if x.target is ops.take_tokens]
    # one gather for the text stream (at its start, the text input), none for any other text-only tensor
    assert [x.args[0].name for x in takes if x.args[3] is text_idx] == [plan.text_start]
    assert not [x for x in gm.graph.nodes
                if x.target is ops.layout_index and all(kind == "txt" for kind, _ in x.args[1])]
    assert len(takes) == 2 + len(plan.side_inputs)  # image start, text start, RoPE tables
    # every projection runs on the subsets: no full-length text or joint matmul is left (FLUX's image
    # embedder x_embedder runs before the image stream's start, on all N tokens, as in every sparse variant) ...
    lengths = _linear_lengths(gm)
    assert lengths[m] == lengths[m + n] == 0 and lengths[n] == (name == "flux") and lengths[k_txt] > 0
    # ... and it is the text work of the context-computing variant, on k_txt tokens (no more, no less)
    compute = _linear_lengths(variant(c, k, ContextMode.COMPUTE, extrapolate=False).gm)
    assert compute[m] > 0 and lengths[k_txt] == compute[m]
    for site in plan.attention:  # queries: both subsets; keys: all M + N tokens in the model's order
        node = next(x for x in gm.graph.nodes if x.name == site.node)
        args = sdpa_args(node)
        queries = k + (k_txt if site.layout.length > n else 0)
        assert args["query"].meta["val"].shape[2] == queries
        assert args["key"].target is ops.attend_keys and args["key"].meta["val"].shape[2] == site.layout.length
        if site.layout.length > n:
            assert args["key"].kwargs["text_idx"] is text_idx and args["key"].kwargs["text_offset"] == site.img_offset
    # no dead text work left (SD3: the last block's dropped text output; FLUX: the sliced-off text rows)
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=lambda x: x.op not in ("call_function", "call_method")
                                 or x.target in (ops.attend_keys,))
    assert len(gm.graph.nodes) == before


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_extrapolated_subset_takes_per_token_text_ratios(captured, name):
    c = captured(name)
    plan = analyze_dit(c.gm)
    v = variant(c, 5, k_txt=3)
    specs = {i.name: i for i in v.new_inputs}
    assert specs["specdiff_kv_ratio_txt_tokens"].shape == (2, plan.num_text_tokens)
    assert "specdiff_kv_ratio_txt" not in specs  # the context-cached variant's [B] ratio
    for i in text_attentions(plan):
        assert specs[f"specdiff_ktp{i}"].in_place and specs[f"specdiff_ktp{i}"].shape == (2, 2, plan.num_text_tokens, 8)


def test_the_text_subset_is_validated(captured):
    c = captured("sd3")
    plan = analyze_dit(c.gm)
    with pytest.raises(ValueError, match="k_txt"):
        VariantKey.sparse(3, ContextMode.SUBSET)
    with pytest.raises(ValueError, match="k_txt"):
        VariantKey.sparse(3, ContextMode.CACHED, k_txt=2)
    with pytest.raises(ValueError, match="k_txt"):
        VariantKey.sparse(3, ContextMode.SUBSET, k_txt=-1)
    with pytest.raises(ValueError, match="sparse"):
        VariantKey(VariantKey.full().kind, context=ContextMode.SUBSET, k_txt=1)
    with pytest.raises(ValueError, match=r"k_txt=6 outside \[0, 5\]"):
        build_variant(c.gm, c.example_inputs, plan, CFG, VariantKey.sparse(3, ContextMode.SUBSET, k_txt=6))
    refused = dataclasses.replace(plan, text_subset_error="because")
    with pytest.raises(ValueError, match="supports no text subset.*because"):
        build_variant(c.gm, c.example_inputs, refused, CFG, VariantKey.sparse(3, ContextMode.SUBSET, k_txt=1))
    v = variant(c, 5, k_txt=3, extrapolate=False)
    named = {"specdiff_idx": torch.tensor([[0, 1, 2, 3, 4]] * 2), "specdiff_idx_txt": torch.tensor([[0, 5, 1]] * 2)}
    named.update({i.name: torch.zeros(i.shape) for i in v.new_inputs if i.name not in named})
    with pytest.raises(ValueError, match=r"out of range \[0, 5\)"):
        run(v, c, named)
    named["specdiff_idx_txt"] = torch.tensor([[0, 1, 1]] * 2)
    with pytest.raises(ValueError, match="duplicates"):
        run(v, c, named)
    named["specdiff_idx_txt"] = torch.tensor([[0, 1, 2]] * 2)
    named["specdiff_kt0"] = torch.zeros(2, 2, 8, 5).transpose(2, 3)  # its in-place update would be lost
    with pytest.raises(ValueError, match="specdiff_kt0 must be contiguous"):
        run(v, c, named)


# -- exactness ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_all_text_and_image_tokens_equal_the_full_variant(captured, reference, name):
    """Every token computed (both in a shuffled order): the full variant's outputs; every cache
    row overwritten with the fresh K/V, every prev row with the old cache."""
    c = captured(name)
    plan = analyze_dit(c.gm)
    n, m = plan.num_image_tokens, plan.num_text_tokens
    full = build_variant(c.gm, c.example_inputs, plan, CFG, VariantKey.full())
    with torch.no_grad():
        user, fx = full.split(full(*c.example_inputs))
    g = torch.Generator().manual_seed(3)
    named = kv_inputs(plan, reference(name, stale=True), reference(name))
    before = {key: t.clone() for key, t in named.items()}
    named.update(specdiff_idx=torch.stack([torch.randperm(n, generator=g) for _ in range(2)]),
                 specdiff_idx_txt=torch.stack([torch.randperm(m, generator=g) for _ in range(2)]),
                 specdiff_kv_ratio=torch.rand(2, n, generator=g),
                 specdiff_kv_ratio_txt_tokens=torch.rand(2, m, generator=g))
    su, sx = run(variant(c, n, k_txt=m), c, named)
    torch.testing.assert_close(sx["tokens"], fx["tokens"], **TOL)
    torch.testing.assert_close(su[0], user[0], **TOL)
    torch.testing.assert_close(sx["score"], fx["score"], **TOL)
    for i in range(len(plan.attention)):
        for ch in "kv":
            for cache in (f"{ch}{i}", f"{ch}t{i}") if i in text_attentions(plan) else (f"{ch}{i}",):
                torch.testing.assert_close(named[f"specdiff_{cache}"], fx[cache], **TOL)
                assert torch.equal(named[prev_name(f"specdiff_{cache}")], before[f"specdiff_{cache}"])


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_no_text_tokens_equal_context_caching(captured, reference, name):
    """``k_txt = 0`` with per-token text ratios all equal to a sample's ratio: the context-cached
    variant's result (and image caches); the text caches are not written."""
    c = captured(name)
    plan = analyze_dit(c.gm)
    n, m = plan.num_image_tokens, plan.num_text_tokens
    g = torch.Generator().manual_seed(4)
    idx, ratio, text_ratio = torch.tensor([[0, 3, 7, 11, 20], [1, 2, 4, 8, 16]]), torch.rand(2, n, generator=g), \
        torch.rand(2, generator=g) * 1.5
    old, now = reference(name, stale=True), reference(name)
    caches = kv_inputs(plan, old, now)
    cached = dict(caches, specdiff_idx=idx, specdiff_kv_ratio=ratio, specdiff_kv_ratio_txt=text_ratio)
    subset = dict({key: t.clone() for key, t in caches.items()}, specdiff_idx=idx, specdiff_kv_ratio=ratio,
                  specdiff_idx_txt=torch.zeros(2, 0, dtype=torch.int64),
                  specdiff_kv_ratio_txt_tokens=text_ratio[:, None].expand(2, m).contiguous())
    texts = {key: t.clone() for key, t in caches.items() if key.startswith(("specdiff_kt", "specdiff_vt"))}
    cu, cx = run(variant(c, 5, ContextMode.CACHED), c, cached)
    su, sx = run(variant(c, 5, k_txt=0), c, subset)
    torch.testing.assert_close(sx["subset"], cx["subset"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sx["score"], cx["score"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(su[0], cu[0], atol=1e-6, rtol=1e-6)
    for key in caches:  # image caches written alike (the cached variant never writes its text caches)
        assert torch.equal(subset[key], cached[key]), key
    assert all(torch.equal(subset[key], t) for key, t in texts.items())


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
@pytest.mark.parametrize("extrapolate", [False, True])
def test_text_subset_matches_the_oracle(captured, reference, name, extrapolate):
    """3 of the 5 text tokens (other ones per sample, unsorted) and 5 image tokens computed:
    the oracle runs those text tokens only and gives every attention their fresh K/V and the
    given (extrapolated) caches' elsewhere. The text caches are written in place at exactly the
    computed rows (``prev <- cache``, ``cache <- fresh``), untouched elsewhere. FLUX gets text
    position ids that differ per token (pipelines pass zeros), so the RoPE rows of the text
    subset must be the right ones."""
    c = captured(name)
    plan = analyze_dit(c.gm)
    n, m = plan.num_image_tokens, plan.num_text_tokens
    inputs = dict(c.inputs)
    if "txt_ids" in inputs:
        inputs["txt_ids"] = torch.arange(m * 3, dtype=torch.float32).reshape(m, 3) % 7
    g = torch.Generator().manual_seed(5)
    idx = torch.tensor([[0, 3, 7, 11, 20], [1, 2, 4, 8, 16]])
    text_idx = torch.tensor([[4, 0, 2], [1, 3, 2]])
    ratio, text_ratio = torch.rand(2, n, generator=g), torch.rand(2, m, generator=g) * 1.5
    named = kv_inputs(plan, reference(name, stale=True), reference(name))
    if not extrapolate:
        named = {key: t for key, t in named.items() if "p" not in key[9:]}
    before = {key: t.clone() for key, t in named.items()}
    named.update(specdiff_idx=idx, specdiff_idx_txt=text_idx, specdiff_kv_ratio=ratio,
                 specdiff_kv_ratio_txt_tokens=text_ratio)
    _, extras = run(variant(c, 5, k_txt=3, extrapolate=extrapolate), c, named, inputs)

    def estimate(cache, r):  # what the attention reads for the non-computed rows
        if not extrapolate:
            return before[cache]
        return before[cache] + r[:, None, :, None] * (before[cache] - before[prev_name(cache)])

    n_attn, with_text = len(plan.attention), text_attentions(plan)
    est = [tuple(estimate(f"specdiff_{ch}{i}", ratio) for ch in "kv") for i in range(n_attn)]
    text_est = [tuple(estimate(f"specdiff_{ch}t{i}", text_ratio) for ch in "kv") for i in with_text]
    with torch.no_grad():
        ref = sparse_reference(c.model, inputs, idx, est, text_est, text_idx=text_idx)
        all_cached = sparse_reference(c.model, inputs, idx, est, text_est)  # no text token fresh
    torch.testing.assert_close(extras["subset"], ref.out_tokens, **TOL)
    torch.testing.assert_close(extras["score"], ref.score, **TOL)
    assert (all_cached.out_tokens - ref.out_tokens).abs().max() > 1e-4  # the fresh text rows matter
    checks = [(f"specdiff_{ch}{i}", f, rows_mask(idx, n)) for i, kv in enumerate(ref.kv) for ch, f in zip("kv", kv)]
    checks += [(f"specdiff_{ch}t{i}", f, rows_mask(text_idx, m)) for i, kv in zip(with_text, ref.text_kv)
               for ch, f in zip("kv", kv)]
    for cache, fresh, rows in checks:  # fresh at the computed rows, the old cache rows kept as prev
        torch.testing.assert_close(named[cache], torch.where(rows, fresh, before[cache]), **TOL)
        assert torch.equal(named[cache][~rows.expand_as(fresh)], before[cache][~rows.expand_as(fresh)])
        if extrapolate:
            prev = prev_name(cache)
            assert torch.equal(named[prev], torch.where(rows, before[cache], before[prev]))
