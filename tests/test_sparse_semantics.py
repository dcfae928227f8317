"""The subset variant against the eager oracle: only the chosen tokens are recomputed,
the others contribute their cached (stale) keys and values."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import full_reference, sparse_reference
from specdiff_fx import SpecDiffConfig, analyze_dit, build_variant
from specdiff_fx.signature import ContextMode, VariantKey

# the attention score is checked too; K/V extrapolation has its own test below
CFG = SpecDiffConfig(inductor=False, score_queries=0, score="attention", kv_extrapolation=False,
                     kv_dtype="model")  # caches as computed: the comparisons are exact
_VARIANTS: dict = {}


def sparse_variant(c, k, config=CFG, context=ContextMode.COMPUTE):
    key = VariantKey.sparse(k, context, config.kv_extrapolation)
    if (c.name, key, config) not in _VARIANTS:
        _VARIANTS[(c.name, key, config)] = build_variant(c.gm, c.example_inputs, analyze_dit(c.gm), config, key)
    return _VARIANTS[(c.name, key, config)]


@pytest.fixture(scope="module")
def stale(reference):
    """K/V caches computed at other inputs (another timestep and latent): stale for c.inputs."""
    return lambda name: reference(name, stale=True).kv


def tier_inputs(variant):
    """Zero history and weights: the tier blend is tested in test_passes."""
    return [torch.zeros(i.shape, dtype=i.dtype) for i in variant.new_inputs[1:3]]


def check_subset(c, kv, idx):
    variant = sparse_variant(c, idx.shape[1])
    caches = [t.contiguous().clone() for pair in kv for t in pair]
    with torch.no_grad():
        _, extras = variant.split(variant(*c.example_inputs, idx, *tier_inputs(variant), *caches))
        ref = sparse_reference(c.model, c.inputs, idx, kv)
    torch.testing.assert_close(extras["subset"], ref.out_tokens, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(extras["score"], ref.score, atol=1e-5, rtol=1e-4)
    for got, want in zip(caches, [t for pair in ref.kv for t in pair]):  # written in place
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    return extras


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
@pytest.mark.parametrize("k", [1, 5, 17])
def test_random_subsets_match_the_oracle(captured, stale, name, k):
    c = captured(name)
    n = analyze_dit(c.gm).num_image_tokens
    for seed in range(2):
        g = torch.Generator().manual_seed(100 * k + seed)
        idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(2)])
        if seed == 1:
            idx = idx.sort(dim=1).values  # sorted and unsorted index sets
        check_subset(c, stale(name), idx)


@pytest.mark.parametrize("name", ["sd3", "flux"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hypothesis_subsets(captured, stale, name, data):
    c = captured(name)
    n = analyze_dit(c.gm).num_image_tokens
    k = data.draw(st.sampled_from([1, 2, 8, n - 1, n]), label="k")
    rows = [data.draw(st.permutations(range(n)), label=f"perm{b}")[:k] for b in range(2)]
    check_subset(c, stale(name), torch.tensor(rows))


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_all_tokens_equal_the_full_variant(captured, stale, name):
    c = captured(name)
    plan = analyze_dit(c.gm)
    n = plan.num_image_tokens
    full = build_variant(c.gm, c.example_inputs, plan, CFG, VariantKey.full())
    with torch.no_grad():
        user, fx = full.split(full(*c.example_inputs))
    idx = torch.arange(n).expand(2, n).contiguous()
    variant = sparse_variant(c, n)
    caches = [t.contiguous().clone() for pair in stale(name) for t in pair]  # all overwritten
    with torch.no_grad():
        su, sx = variant.split(variant(*c.example_inputs, idx, *tier_inputs(variant), *caches))
    torch.testing.assert_close(sx["tokens"], fx["tokens"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sx["subset"], fx["tokens"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(su[0], user[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(sx["score"], fx["score"], atol=1e-5, rtol=1e-4)
    n_attn = len(plan.attention)
    for i in range(n_attn):
        torch.testing.assert_close(caches[2 * i], fx[f"k{i}"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(caches[2 * i + 1], fx[f"v{i}"], atol=1e-5, rtol=1e-4)


def test_stale_cache_changes_the_result(captured, stale):
    """The test above could pass with a variant that ignores the caches; this one can't."""
    c = captured("sd3")
    idx = torch.tensor([[0, 5, 9], [2, 3, 4]])
    with torch.no_grad():
        exact = full_reference(c.model, c.inputs)
    out_stale = check_subset(c, stale("sd3"), idx)["subset"]
    out_exact = check_subset(c, exact.kv, idx)["subset"]
    full_at_idx = torch.gather(exact.out_tokens, 1, idx[..., None].expand(-1, -1, exact.out_tokens.shape[2]))
    torch.testing.assert_close(out_exact, full_at_idx, atol=1e-5, rtol=1e-4)
    assert (out_stale - full_at_idx).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_kv_extrapolation_matches_the_oracle_on_extrapolated_caches(captured, reference, stale, name):
    """With ``kv_extrapolation`` the subset attends to ``cache + r * (cache - prev)`` (fresh
    rows for the computed tokens); afterwards ``prev`` holds the old cache rows and ``cache``
    the fresh ones at the computed tokens, both untouched elsewhere."""
    c = captured(name)
    plan = analyze_dit(c.gm)
    n, k = plan.num_image_tokens, 5
    config = CFG.replace(kv_extrapolation=True)
    variant = sparse_variant(c, k, config)
    names = [i.name for i in variant.new_inputs]
    n_attn = len(plan.attention)
    assert names[3] == "specdiff_kv_ratio"
    assert names[4:] == [f"specdiff_{c}{p}{i}" for i in range(n_attn) for c in "kv" for p in ("", "p")]
    cache = [t.contiguous().clone() for pair in stale(name) for t in pair]
    prev = [t.contiguous().clone() for pair in reference(name).kv for t in pair]
    ratio = torch.rand(2, n, generator=torch.Generator().manual_seed(1)) * 1.5
    idx = torch.tensor([[0, 3, 7, 11, 20], [1, 2, 4, 8, 16]])
    est = [ca + ratio[:, None, :, None] * (ca - p) for ca, p in zip(cache, prev)]
    old_cache, old_prev = [t.clone() for t in cache], [t.clone() for t in prev]
    named = {"specdiff_idx": idx, "specdiff_kv_ratio": ratio,
             **dict(zip(names[1:3], tier_inputs(variant)))}
    for i in range(n_attn):
        for j, ch in enumerate("kv"):
            named[f"specdiff_{ch}{i}"], named[f"specdiff_{ch}p{i}"] = cache[2 * i + j], prev[2 * i + j]
    with torch.no_grad():
        _, extras = variant.split(variant(*c.example_inputs, *variant.extra_inputs(named)))
        ref = sparse_reference(c.model, c.inputs, idx, [(est[2 * i], est[2 * i + 1]) for i in range(n_attn)])
    torch.testing.assert_close(extras["subset"], ref.out_tokens, atol=1e-5, rtol=1e-4)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[torch.arange(2)[:, None], idx] = True
    m = mask[:, None, :, None]
    fresh = [t for pair in ref.kv for t in pair]
    for got_c, got_p, f, oc, op in zip(cache, prev, fresh, old_cache, old_prev):
        torch.testing.assert_close(got_c, torch.where(m, f, oc), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_p, torch.where(m, oc, op))
    # the extrapolation matters: reusing the stale caches gives another result
    plain = check_subset(c, stale(name), idx)["subset"]
    assert (plain - extras["subset"]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_context_caching_matches_the_oracle(captured, reference, stale, name):
    """With the context cached (``ContextMode.CACHED``) no text token is computed: every attention reads the
    text K/V from the given caches (extrapolated like the image ones); the image K/V caches are written in
    place as with the context computed."""
    c = captured(name)
    plan = analyze_dit(c.gm)
    n, k = plan.num_image_tokens, 5
    variant = sparse_variant(c, k, CFG.replace(kv_extrapolation=True), ContextMode.CACHED)
    names = [i.name for i in variant.new_inputs]
    old, now = reference(name, stale=True), reference(name)
    assert len(now.text_kv) == sum(n_.startswith("specdiff_kt") and not n_.startswith("specdiff_ktp") for n_ in names)
    g = torch.Generator().manual_seed(2)
    ratio, text_ratio = torch.rand(2, n, generator=g), torch.rand(2, generator=g) * 1.5
    named = {"specdiff_idx": torch.tensor([[0, 3, 7, 11, 20], [1, 2, 4, 8, 16]]), "specdiff_kv_ratio": ratio,
             "specdiff_kv_ratio_txt": text_ratio, **dict(zip(names[1:3], tier_inputs(variant)))}
    est, text_est = [], []
    t = 0
    for i, (kv_old, kv_now) in enumerate(zip(old.kv, now.kv)):
        for ch, a, b in zip("kv", kv_old, kv_now):
            named[f"specdiff_{ch}{i}"], named[f"specdiff_{ch}p{i}"] = a.contiguous().clone(), b.contiguous().clone()
        est.append(tuple(a + ratio[:, None, :, None] * (a - b) for a, b in zip(kv_old, kv_now)))
        if f"specdiff_kt{i}" in names:
            for ch, a, b in zip("kv", old.text_kv[t], now.text_kv[t]):
                named[f"specdiff_{ch}t{i}"], named[f"specdiff_{ch}tp{i}"] = a.contiguous(), b.contiguous()
            text_est.append(tuple(a + text_ratio[:, None, None, None] * (a - b)
                                  for a, b in zip(old.text_kv[t], now.text_kv[t])))
            t += 1
    image = [f"specdiff_{ch}{p}{i}" for i in range(len(now.kv)) for p in ("", "p") for ch in "kv"]
    before = {key: named[key].clone() for key in image}
    with torch.no_grad():
        _, extras = variant.split(variant(*c.example_inputs, *variant.extra_inputs(named)))
        ref = sparse_reference(c.model, c.inputs, named["specdiff_idx"], est, text_est)
        keep = sparse_reference(c.model, c.inputs, named["specdiff_idx"], est)  # text computed
    torch.testing.assert_close(extras["subset"], ref.out_tokens, atol=1e-5, rtol=1e-4)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[torch.arange(2)[:, None], named["specdiff_idx"]] = True
    m = mask[:, None, :, None]
    for i, fresh in enumerate(ref.kv):  # fresh K/V at the computed tokens, the old cache rows kept as prev
        for ch, f in zip("kv", fresh):
            cur, prev = f"specdiff_{ch}{i}", f"specdiff_{ch}p{i}"
            torch.testing.assert_close(named[cur], torch.where(m, f, before[cur]), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(named[prev], torch.where(m, before[cur], before[prev]))
    assert (keep.out_tokens - ref.out_tokens).abs().max() > 1e-4  # the text caches matter
