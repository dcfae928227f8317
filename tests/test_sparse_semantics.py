"""The subset variant against the eager oracle: only the chosen tokens are recomputed,
the others contribute their cached (stale) keys and values."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import full_reference, sparse_reference
from specdiff_fx import SpecDiffConfig, analyze_dit, build_variant

CFG = SpecDiffConfig(inductor=False, score_queries=0)
_VARIANTS: dict = {}


def sparse_variant(c, k):
    key = (c.name, k)
    if key not in _VARIANTS:
        _VARIANTS[key] = build_variant(c.gm, c.example_inputs, analyze_dit(c.gm), CFG, "sparse", k=k)
    return _VARIANTS[key]


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
    full = build_variant(c.gm, c.example_inputs, plan, CFG, "full")
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
