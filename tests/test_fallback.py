"""Graphs the rewrite does not support are compiled untouched, with a readable reason."""

import warnings

import pytest
import torch

import specdiff_fx
import specdiff_fx.dynamo_backend as backend_mod
import specdiff_fx.variants as variants_mod
from oracle import sd3_inputs, tiny_sd3


class MLP(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.GELU(), torch.nn.Linear(width, 4))

    def forward(self, x):
        return self.net(x)


@pytest.fixture(autouse=True)
def fresh_warnings():
    backend_mod._WARNED.clear()
    torch._dynamo.reset()
    yield


@pytest.mark.inductor
def test_mlp_falls_back_to_inductor_and_warns_once():
    torch.manual_seed(0)
    mlp, mlp2 = MLP(), MLP(16)
    x = torch.randn(3, 4)
    be = specdiff_fx.backend()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = torch.compile(mlp, backend=be)(x)
            out2 = torch.compile(mlp2, backend=be)(x)  # a second graph, same reason
    with torch.no_grad():
        torch.testing.assert_close(out, mlp(x))
        torch.testing.assert_close(out2, mlp2(x))
    ours = [w for w in caught if "specdiff" in str(w.message)]
    assert len(ours) == 1 and "falling back to plain Inductor" in str(ours[0].message)
    assert [r.status for r in be.records] == ["fallback", "fallback"]
    assert "no supported DiT" in be.records[0].reason
    assert specdiff_fx.last_record() is be.records[-1]
    assert "no supported DiT" in str(be.records[0])


def test_fallback_via_string_backend_is_recorded():
    mlp = MLP()
    x = torch.randn(3, 4)
    with pytest.warns(RuntimeWarning, match="no supported DiT"), torch.no_grad():
        out = torch.compile(mlp, backend="specdiff", options={"inductor": False})(x)
    with torch.no_grad():
        torch.testing.assert_close(out, mlp(x))
    rec = specdiff_fx.last_record()
    assert rec.status == "fallback" and rec.plan is None and "no supported DiT" in rec.reason


def test_strict_raises_with_the_reason():
    with pytest.raises(Exception, match="no supported DiT"), torch.no_grad():
        torch.compile(MLP(), backend=specdiff_fx.backend(strict=True, inductor=False))(torch.randn(3, 4))


def test_a_failing_pass_falls_back_with_the_reason(monkeypatch):
    def broken_pass(gm, ctx):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(variants_mod, "passes_for", lambda variant, config: (broken_pass,))
    model, inputs = tiny_sd3(), sd3_inputs(2, 8, 8)
    be = specdiff_fx.backend(cache_ratio=0.5, inductor=False)
    with pytest.warns(RuntimeWarning, match="injected failure"), torch.no_grad():
        out = torch.compile(model, backend=be)(**inputs).sample
        ref = model(**inputs).sample
    torch.testing.assert_close(out, ref)
    rec = be.records[-1]
    assert rec.status == "fallback" and rec.family == "sd3" and "injected failure" in rec.reason
    be_strict = specdiff_fx.backend(cache_ratio=0.5, inductor=False, strict=True)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="injected failure"), torch.no_grad():
        torch.compile(model, backend=be_strict)(**inputs)


def test_positional_arguments_fall_back_with_a_hint():
    """A transformer called with positional arguments: its graph inputs carry no names, so the
    latent and the timestep cannot be found; the fallback's reason says to pass keywords."""
    model, inputs = tiny_sd3(), sd3_inputs(2, 8, 8)
    be = specdiff_fx.backend(inductor=False)
    args = [inputs[k] for k in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")]
    with pytest.warns(RuntimeWarning, match="pass its inputs as keywords"), torch.no_grad():
        out = torch.compile(model, backend=be)(*args).sample
        ref = model(*args).sample
    torch.testing.assert_close(out, ref)
    assert be.records[-1].status == "fallback" and "positional arguments" in be.records[-1].reason


def test_grad_mode_compiles_without_caching():
    model, inputs = tiny_sd3(), sd3_inputs(1, 8, 8)
    be = specdiff_fx.backend(cache_ratio=0.5, inductor=False)
    with pytest.warns(RuntimeWarning, match="gradients are enabled"):
        out = torch.compile(model, backend=be)(**inputs).sample
    assert out.requires_grad
    torch.testing.assert_close(out, model(**inputs).sample)
    assert be.records[-1].status == "plain"


def test_a_native_attention_backend_says_which_one_is_supported(fresh_warnings):
    """diffusers' ``_native_*`` attention backends wrap each attention in ``_sdpa_kernel`` calls
    that Dynamo records outside any module, so a block is no longer one run of nodes: the graph
    falls back, and the reason says what is in the way and which backend is supported."""
    from diffusers.models.attention_dispatch import attention_backend
    from family_models import flux2_inputs, tiny_flux2

    model = tiny_flux2()
    be = specdiff_fx.backend(inductor=False)
    torch._dynamo.reset()
    # set_attention_backend also sets diffusers' process-wide active backend, for every model
    # (reset_attention_backend does not undo that): the context restores it for later tests
    with attention_backend("native"), torch.no_grad():
        model.set_attention_backend("_native_math")
        out = torch.compile(model, backend=be)(**flux2_inputs(2, 4, 6), return_dict=False)[0]
        ref = model(**flux2_inputs(2, 4, 6), return_dict=False)[0]
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref)
    assert [r.status for r in be.records] == ["fallback"]
    assert "_sdpa_kernel" in be.records[0].reason and 'set_attention_backend("native")' in be.records[0].reason
