"""``torch.compile(..., backend="specdiff", mode=...)``: the mode reaches Inductor for every graph,
CUDA graphs excepted for the rewritten variants (their outputs are kept as caches across calls),
and an unknown mode is refused before any graph is compiled."""

import warnings

import pytest
import torch

import specdiff_fx
from oracle import sd3_inputs, tiny_sd3
from specdiff_fx.variants import NO_CUDAGRAPHS, asks_for_cudagraphs, mode_options
from test_hardening import euler


@pytest.fixture
def recorded(monkeypatch):
    """Inductor replaced by a recorder: each compile's config patches, the graph run as plain FX."""
    import torch._inductor.compile_fx as cfx

    calls = []

    def fake_compile_fx(gm, example_inputs, config_patches=None, **kwargs):
        calls.append((gm, dict(config_patches or {})))
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)
    return calls


def generate(mode, **options):
    """torch.compile takes ``mode`` or ``options``, not both: with options, the backend object."""
    torch._dynamo.reset()
    backend = specdiff_fx.backend(mode=mode, **options) if options else "specdiff"
    with torch.no_grad():
        return euler(torch.compile(tiny_sd3(0), backend=backend, mode=None if options else mode),
                     sd3_inputs(2, 8, 8), steps=6)


def test_mode_options():
    assert mode_options(None) == mode_options("default") == {}
    assert mode_options("reduce-overhead")["triton.cudagraphs"] is True
    assert "triton.cudagraphs" not in mode_options("max-autotune-no-cudagraphs")
    assert asks_for_cudagraphs("max-autotune") and not asks_for_cudagraphs("max-autotune-no-cudagraphs")
    for bad in ("bogus", 3):
        with pytest.raises(ValueError, match="mode"):
            mode_options(bad)


def test_unknown_mode_is_refused_before_compiling(recorded):
    with pytest.raises(ValueError, match="unknown mode 'bogus'.*max-autotune"):
        specdiff_fx.backend(mode="bogus")
    with pytest.raises(Exception, match="unknown mode 'bogus'"):  # through Dynamo: BackendCompilerFailed
        generate("bogus")
    assert recorded == []  # nothing was compiled


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_variants_keep_the_mode_without_cudagraphs(recorded, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # on the CPU nothing to warn about: CUDA graphs are a GPU matter
        out = generate(mode)
    ours = list(recorded)
    assert torch.equal(out, generate(None))  # (Inductor recorded away: the same graphs, as plain FX)
    variants = [patches for gm, patches in ours if gm.meta.get("specdiff_outputs") is not None]
    assert len(variants) >= 2 and len(variants) == len(ours)  # full + sparse (+ skip), all rewritten
    expected = {**mode_options(mode), **NO_CUDAGRAPHS}
    for patches in variants:
        assert {k: patches[k] for k in expected} == expected, patches


def test_untouched_graph_gets_the_mode_as_is(recorded):
    """cache_ratio=0 (and a fallback) is plain Inductor: the mode applies whole, CUDA graphs included."""
    generate("reduce-overhead", cache_ratio=0.0)
    assert [patches for _, patches in recorded] == [{"triton.cudagraphs": True}]
    assert specdiff_fx.last_record().status == "plain"


def test_mode_without_inductor_is_warned(recorded):
    with pytest.warns(RuntimeWarning, match="no effect with inductor=False"):
        specdiff_fx.backend(mode="max-autotune-no-cudagraphs", inductor=False)
