"""Tests of the eager caching oracle in ``tests/oracle.py``.

They check the oracle against diffusers itself (model output, and the q/k/v that the
unmodified processors feed to ``scaled_dot_product_attention``) and for internal
consistency (sparse with every token or with an exact cache reproduces the full run).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor

try:
    from oracle import (
        KV,
        FullRef,
        full_reference,
        flux_inputs,
        num_attention_calls,
        num_image_tokens,
        sd3_inputs,
        sparse_reference,
        tiny_flux,
        tiny_sd3,
        unpatchify,
    )
except ImportError:  # tests/ imported as a package
    from tests.oracle import (  # type: ignore[no-redef]
        KV,
        FullRef,
        full_reference,
        flux_inputs,
        num_attention_calls,
        num_image_tokens,
        sd3_inputs,
        sparse_reference,
        tiny_flux,
        tiny_sd3,
        unpatchify,
    )

KINDS = ("sd3", "sd35", "flux")
ATOL = 1e-5
RTOL = 1e-4

# (height, width): latent pixels for SD3 (patch 2), tokens for FLUX (patch 1).
SQUARE = {"sd3": (10, 10), "sd35": (10, 10), "flux": (5, 5)}  # N = 25
NON_SQUARE = {"sd3": (12, 6), "sd35": (6, 14), "flux": (3, 7)}  # N = 18, 21, 21


@functools.lru_cache(maxsize=None)
def model_of(kind: str) -> torch.nn.Module:
    if kind == "flux":
        return tiny_flux(0)
    return tiny_sd3(0, sd35=(kind == "sd35"))


def inputs_of(kind: str, batch: int, shape: tuple[int, int], seed: int = 0) -> dict[str, Tensor]:
    if kind == "flux":
        return flux_inputs(batch, shape[0], shape[1], seed)
    return sd3_inputs(batch, shape[0], shape[1], seed)


@functools.lru_cache(maxsize=None)
def _full_cached(kind: str, batch: int, shape: tuple[int, int], seed: int) -> FullRef:
    return full_reference(model_of(kind), inputs_of(kind, batch, shape, seed))


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b]]`` stacked over the batch."""
    return torch.stack([x[b, idx[b]] for b in range(idx.shape[0])])


def random_idx(batch: int, n: int, k: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])


def assert_kv_close(actual: list[KV], expected: list[KV]) -> None:
    assert len(actual) == len(expected)
    for (k_a, v_a), (k_e, v_e) in zip(actual, expected):
        torch.testing.assert_close(k_a, k_e, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(v_a, v_e, atol=ATOL, rtol=RTOL)


def processor_ids(model: torch.nn.Module) -> dict[str, int]:
    return {name: id(p) for name, p in model.attn_processors.items()}


@contextlib.contextmanager
def spy_sdpa() -> Iterator[list[tuple[Tensor, Tensor, Tensor]]]:
    """Record (q, k, v) of every ``F.scaled_dot_product_attention`` call, as fed to it."""
    calls: list[tuple[Tensor, Tensor, Tensor]] = []
    original: Callable[..., Tensor] = torch.nn.functional.scaled_dot_product_attention

    def spy(query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        calls.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
        return original(query, key, value, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        yield calls
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


# --------------------------------------------------------------------------------------
# full_reference against diffusers
# --------------------------------------------------------------------------------------


def test_tiny_models_have_expected_structure() -> None:
    assert [num_attention_calls(model_of(k)) for k in KINDS] == [3, 4, 4]
    for kind in KINDS:
        model = model_of(kind)
        assert not model.training
        assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("shapes", [SQUARE, NON_SQUARE], ids=["square", "non_square"])
def test_full_reference_reproduces_model_output(kind: str, batch: int, shapes: dict[str, tuple[int, int]]) -> None:
    model = model_of(kind)
    inputs = inputs_of(kind, batch, shapes[kind])
    ref = full_reference(model, inputs)

    n = num_image_tokens(model, inputs)
    c_out = model.config.patch_size**2 * model.out_channels
    heads, head_dim = model.config.num_attention_heads, model.config.attention_head_dim
    assert ref.out_tokens.shape == (batch, n, c_out)
    assert len(ref.kv) == num_attention_calls(model)
    for k, v in ref.kv:
        assert k.shape == v.shape == (batch, heads, n, head_dim)
    assert ref.score.shape == (batch, n)
    assert bool(torch.isfinite(ref.score).all()) and bool((ref.score > 0).all())

    with torch.no_grad():
        expected = model(**inputs).sample
    torch.testing.assert_close(unpatchify(model, ref.out_tokens, inputs), expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", KINDS)
def test_full_reference_kv_and_score_match_sdpa_inputs(kind: str) -> None:
    """With the model's own processors, record what SDPA receives; the oracle's image
    K/V and score must match it (independent of the oracle's processors)."""
    model = model_of(kind)
    inputs = inputs_of(kind, 2, NON_SQUARE[kind], seed=3)
    n = num_image_tokens(model, inputs)
    with torch.no_grad(), spy_sdpa() as calls:
        model(**inputs)
    ref = full_reference(model, inputs)
    assert len(calls) == len(ref.kv)

    expected_score = torch.zeros(2, n)
    for (q, k, v), (k_img, v_img) in zip(calls, ref.kv):
        # FLUX: text first; SD3: image first (joint) or image only (attn2).
        image = slice(k.shape[2] - n, k.shape[2]) if kind == "flux" else slice(0, n)
        torch.testing.assert_close(k_img, k[:, :, image], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(v_img, v[:, :, image], atol=ATOL, rtol=RTOL)
        probs = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5).softmax(-1)
        expected_score += probs.mean(1).sum(1)[:, image]
    torch.testing.assert_close(ref.score, expected_score, atol=ATOL, rtol=RTOL)
    if kind == "sd35":  # call 1 is attn2 of the dual block 0: image-only self-attention
        assert calls[1][1].shape[2] == n and calls[0][1].shape[2] == n + 5


@pytest.mark.parametrize("kind", KINDS)
def test_return_dict_in_inputs_is_ignored(kind: str) -> None:
    model = model_of(kind)
    inputs = inputs_of(kind, 1, SQUARE[kind])
    ref = _full_cached(kind, 1, SQUARE[kind], 0)
    for flag in (True, False):
        torch.testing.assert_close(full_reference(model, {**inputs, "return_dict": flag}).out_tokens, ref.out_tokens)
        idx = torch.arange(num_image_tokens(model, inputs))[None]
        sparse = sparse_reference(model, {**inputs, "return_dict": flag}, idx, ref.kv)
        torch.testing.assert_close(sparse.out_tokens, ref.out_tokens, atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------
# sparse_reference: consistency with full_reference
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order", ["arange", "permuted"])
def test_sparse_with_all_tokens_equals_full(kind: str, order: str) -> None:
    model = model_of(kind)
    shape = NON_SQUARE[kind]
    inputs = inputs_of(kind, 2, shape)
    full = _full_cached(kind, 2, shape, 0)
    n = num_image_tokens(model, inputs)
    idx = torch.arange(n).repeat(2, 1) if order == "arange" else random_idx(2, n, n, seed=7)

    sparse = sparse_reference(model, inputs, idx, full.kv)
    torch.testing.assert_close(sparse.out_tokens, gather_tokens(full.out_tokens, idx), atol=ATOL, rtol=RTOL)
    assert_kv_close(sparse.kv, full.kv)
    torch.testing.assert_close(sparse.score, full.score, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("batch", [1, 2])
def test_sparse_subset_with_exact_cache_equals_full(kind: str, batch: int) -> None:
    model = model_of(kind)
    shape = SQUARE[kind]
    inputs = inputs_of(kind, batch, shape)
    full = _full_cached(kind, batch, shape, 0)
    n = num_image_tokens(model, inputs)
    idx = random_idx(batch, n, 7, seed=11)

    sparse = sparse_reference(model, inputs, idx, full.kv)
    assert sparse.out_tokens.shape == (batch, 7, full.out_tokens.shape[-1])
    torch.testing.assert_close(sparse.out_tokens, gather_tokens(full.out_tokens, idx), atol=ATOL, rtol=RTOL)
    assert_kv_close(sparse.kv, full.kv)
    # Fewer query rows, identical probabilities: received attention can only shrink.
    assert sparse.score.shape == (batch, n)
    assert bool((sparse.score <= full.score + ATOL).all())
    assert bool((sparse.score < full.score - 1e-3).any())


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_sparse_exact_cache_property(kind: str, data: st.DataObject) -> None:
    model = model_of(kind)
    shape = NON_SQUARE[kind]
    inputs = inputs_of(kind, 2, shape)
    full = _full_cached(kind, 2, shape, 0)
    n = num_image_tokens(model, inputs)
    k = data.draw(st.integers(1, n), label="k")
    idx = random_idx(2, n, k, seed=data.draw(st.integers(0, 2**16), label="seed"))

    sparse = sparse_reference(model, inputs, idx, full.kv)
    torch.testing.assert_close(sparse.out_tokens, gather_tokens(full.out_tokens, idx), atol=ATOL, rtol=RTOL)
    assert_kv_close(sparse.kv, full.kv)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_score_is_additive_over_query_rows(kind: str) -> None:
    """With an exact cache every computed row has its full-run probabilities, so for a
    partition A|B of the image tokens: s(A) + s(B) - full = text rows' part
    = s(C) + s(D) - s(C ∪ D) for any disjoint C, D."""
    model = model_of(kind)
    shape = SQUARE[kind]
    inputs = inputs_of(kind, 1, shape)
    full = _full_cached(kind, 1, shape, 0)
    n = num_image_tokens(model, inputs)
    perm = random_idx(1, n, n, seed=5)

    def s(idx: Tensor) -> Tensor:
        return sparse_reference(model, inputs, idx, full.kv).score

    text_part = s(perm[:, :10]) + s(perm[:, 10:]) - full.score
    text_part2 = s(perm[:, :3]) + s(perm[:, 3:8]) - s(perm[:, :8])
    torch.testing.assert_close(text_part, text_part2, atol=1e-4, rtol=1e-4)
    assert bool((text_part > 0).all())


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_with_stale_cache_differs_and_updates_only_idx(kind: str) -> None:
    model = model_of(kind)
    shape = SQUARE[kind]
    inputs = inputs_of(kind, 2, shape)
    full = _full_cached(kind, 2, shape, 0)
    stale_inputs = {**inputs, "timestep": inputs["timestep"] * 0.5}
    stale = full_reference(model, stale_inputs)
    n = num_image_tokens(model, inputs)
    idx = random_idx(2, n, 9, seed=13)

    sparse = sparse_reference(model, inputs, idx, stale.kv)
    expected = gather_tokens(full.out_tokens, idx)
    assert (sparse.out_tokens - expected).abs().max() > 1e-3

    kept = torch.ones(2, n, dtype=torch.bool)
    for b in range(2):
        kept[b, idx[b]] = False
    for (k_new, v_new), (k_stale, v_stale) in zip(sparse.kv, stale.kv):
        for new, old in ((k_new, k_stale), (v_new, v_stale)):
            torch.testing.assert_close(new.transpose(1, 2)[kept], old.transpose(1, 2)[kept], atol=0, rtol=0)
            assert (new.transpose(1, 2)[~kept] - old.transpose(1, 2)[~kept]).abs().max() > 1e-4
    # The first attention call sees fresh inputs only, so its fresh K/V are exact.
    k0, v0 = sparse.kv[0]
    torch.testing.assert_close(gather_tokens(k0.transpose(1, 2), idx), gather_tokens(full.kv[0][0].transpose(1, 2), idx))

    # Samples are independent: batch of 2 == each sample alone.
    for b in range(2):
        alone = {key: (val[b : b + 1] if key not in ("img_ids", "txt_ids") else val) for key, val in inputs.items()}
        kv_b = [(k[b : b + 1], v[b : b + 1]) for k, v in stale.kv]
        single = sparse_reference(model, alone, idx[b : b + 1], kv_b)
        torch.testing.assert_close(single.out_tokens, sparse.out_tokens[b : b + 1], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(single.score, sparse.score[b : b + 1], atol=ATOL, rtol=RTOL)
        assert_kv_close(single.kv, [(k[b : b + 1], v[b : b + 1]) for k, v in sparse.kv])


# --------------------------------------------------------------------------------------
# Hygiene: no mutation, processors restored, argument validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_and_caches_are_not_mutated(kind: str) -> None:
    model = model_of(kind)
    inputs = inputs_of(kind, 2, NON_SQUARE[kind], seed=4)
    inputs_copy = {k: v.clone() for k, v in inputs.items()}
    stale = full_reference(model, {**inputs, "timestep": inputs["timestep"] * 0.3})
    kv_copy = [(k.clone(), v.clone()) for k, v in stale.kv]
    n = num_image_tokens(model, inputs)
    idx = random_idx(2, n, 6, seed=2)
    idx_copy = idx.clone()

    full_reference(model, inputs)
    sparse = sparse_reference(model, inputs, idx, stale.kv)

    for key, value in inputs.items():
        assert torch.equal(value, inputs_copy[key]), key
    assert torch.equal(idx, idx_copy)
    for (k, v), (k0, v0), (k_new, _) in zip(stale.kv, kv_copy, sparse.kv):
        assert torch.equal(k, k0) and torch.equal(v, v0)
        assert k_new.data_ptr() != k.data_ptr()


@pytest.mark.parametrize("kind", KINDS)
def test_processors_are_restored_also_on_error(kind: str) -> None:
    model = model_of(kind)
    before = processor_ids(model)
    inputs = inputs_of(kind, 1, SQUARE[kind])
    full = _full_cached(kind, 1, SQUARE[kind], 0)
    sparse_reference(model, inputs, torch.tensor([[0, 3]]), full.kv)
    assert processor_ids(model) == before

    bad_kv = list(full.kv)
    bad_kv[-1] = (bad_kv[-1][0][:, :, :-1], bad_kv[-1][1][:, :, :-1])  # wrong N, found mid-forward
    with pytest.raises(ValueError, match="cache of attention call"):
        sparse_reference(model, inputs, torch.tensor([[0, 3]]), bad_kv)
    assert processor_ids(model) == before


@pytest.mark.parametrize("kind", KINDS)
def test_invalid_arguments_are_rejected(kind: str) -> None:
    model = model_of(kind)
    inputs = inputs_of(kind, 2, SQUARE[kind])
    full = _full_cached(kind, 2, SQUARE[kind], 0)
    n = num_image_tokens(model, inputs)
    bad_idx = [
        torch.tensor([[0, 1], [2, 2]]),  # duplicate
        torch.tensor([[0, n], [1, 2]]),  # out of range
        torch.tensor([[0, -1], [1, 2]]),  # negative
        torch.tensor([[0, 1]]),  # wrong batch
        torch.tensor([[0.0, 1.0], [2.0, 3.0]]),  # not long
        torch.zeros(2, 0, dtype=torch.long),  # empty
    ]
    for idx in bad_idx:
        with pytest.raises(ValueError):
            sparse_reference(model, inputs, idx, full.kv)
    with pytest.raises(ValueError, match="kv has"):
        sparse_reference(model, inputs, torch.tensor([[0, 1], [2, 3]]), full.kv[:-1])
