"""Hardening: bad input, fallbacks, state, shape changes, recompiles, numerics, fuzzing."""

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import specdiff_fx
from oracle import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3
from specdiff_fx import SpecDiffConfig, analyze_dit, build_variant
from specdiff_fx.signature import VariantKey
from specdiff_fx.variants import check_index

FAST = {"inductor": False, "controller": "fixed", "warmup_steps": 2, "refresh_at": (0.6,)}


def euler(model, inputs, steps=8, sigmas=None, on_step=None, **call_kwargs):
    """A minimal flow-matching loop calling ``model`` like a pipeline would (``call_kwargs``: more
    keyword arguments of every call, e.g. ``joint_attention_kwargs``)."""
    x = inputs["hidden_states"].clone()
    sigmas = torch.linspace(1, 0, steps + 1) if sigmas is None else sigmas
    per_sigma = 1.0 if "img_ids" in inputs else 1000.0
    for i in range(len(sigmas) - 1):
        if on_step:
            on_step(i)
        kw = dict(inputs, hidden_states=x, timestep=torch.full((x.shape[0],), float(sigmas[i]) * per_sigma))
        v = model(**kw, **call_kwargs).sample
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend=specdiff_fx.backend(**{**FAST, **options}))


# -- options and indices (fuzzed) --------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(ratio=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.text(max_size=3),
                       st.booleans(), st.none()))
def test_fuzz_cache_ratio(ratio):
    valid = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1
    if valid:
        assert SpecDiffConfig.from_options({"cache_ratio": ratio}).cache_ratio == ratio
    else:
        with pytest.raises(ValueError, match="cache_ratio"):
            SpecDiffConfig.from_options({"cache_ratio": ratio})


@settings(max_examples=60, deadline=None)
@given(options=st.dictionaries(st.sampled_from(SpecDiffConfig.valid_keys() + ("bogus",)),
                               st.one_of(st.integers(-2, 40), st.floats(-1, 2), st.booleans(), st.none()),
                               max_size=4))
def test_fuzz_options_never_half_valid(options):
    """Any options dict either builds a config that round-trips, or raises ValueError."""
    try:
        cfg = SpecDiffConfig.from_options(options)
    except ValueError as e:
        assert "specdiff" in str(e)
    else:
        assert SpecDiffConfig.from_options(cfg.to_dict()) == cfg


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_fuzz_token_index_validation(data):
    n = 24
    k = data.draw(st.integers(1, n))
    rows = [data.draw(st.lists(st.integers(-2, n + 1), min_size=k, max_size=k)) for _ in range(2)]
    idx = torch.tensor(rows)
    valid = all(0 <= v < n for r in rows for v in r) and all(len(set(r)) == len(r) for r in rows)
    if valid:
        check_index(idx, (2, k), n)
    else:
        with pytest.raises(ValueError, match="token index"):
            check_index(idx, (2, k), n)
    with pytest.raises(ValueError, match="int64"):
        check_index(idx.int(), (2, k), n)


def test_token_index_check_without_values_reads_none():
    """``check_values=False`` (the runtime's own, topk-built indices) checks dtype and shape
    without reading the values: it passes on a meta tensor, which has none to read."""
    idx = torch.empty(2, 5, dtype=torch.int64, device="meta")
    check_index(idx, (2, 5), 24, check_values=False)
    with pytest.raises(ValueError, match="shape"):
        check_index(idx, (2, 4), 24, check_values=False)
    with pytest.raises(ValueError, match="int64"):
        check_index(idx.int(), (2, 5), 24, check_values=False)
    with pytest.raises((NotImplementedError, RuntimeError)):  # the full check reads the values
        check_index(idx, (2, 5), 24)


def test_sparse_variant_rejects_bad_indices_and_caches(captured):
    c = captured("sd3")
    plan = analyze_dit(c.gm)
    v = build_variant(c.gm, c.example_inputs, plan, SpecDiffConfig(inductor=False), VariantKey.sparse(3))
    rest = [torch.zeros(i.shape) for i in v.new_inputs[1:]]
    with pytest.raises(ValueError, match="duplicates"):
        v(*c.example_inputs, torch.tensor([[1, 1, 2], [0, 1, 2]]), *rest)
    with pytest.raises(ValueError, match="out of range"):
        v(*c.example_inputs, torch.tensor([[1, 99, 2], [0, 1, 2]]), *rest)
    k0 = [i.name for i in v.new_inputs].index("specdiff_k0") - 1
    rest[k0] = rest[k0].transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        v(*c.example_inputs, torch.tensor([[1, 5, 2], [0, 1, 2]]), *rest)


# -- fallbacks ---------------------------------------------------------------------------

def test_unet_falls_back():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([10])
    be = specdiff_fx.backend(inductor=False)
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="no supported DiT"), torch.no_grad():
        out = torch.compile(unet, backend=be)(x, t).sample
        torch.testing.assert_close(out, unet(x, t).sample)
    assert be.records[-1].status == "fallback"


class ManualAttention:
    """A custom attention processor that computes softmax(QK^T)V by hand."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        b = hidden_states.shape[0]
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        n = hidden_states.shape[1]
        if encoder_hidden_states is not None:
            q = torch.cat([q, attn.add_q_proj(encoder_hidden_states)], 1)
            k = torch.cat([k, attn.add_k_proj(encoder_hidden_states)], 1)
            v = torch.cat([v, attn.add_v_proj(encoder_hidden_states)], 1)
        h = attn.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        out = (w @ v).transpose(1, 2).reshape(b, -1, h * q.shape[-1])
        img, txt = out[:, :n], out[:, n:]
        img = attn.to_out[0](img)
        if encoder_hidden_states is None:
            return img
        return img, (attn.to_add_out(txt) if not attn.context_pre_only else txt)


def test_custom_attention_processor_falls_back_correctly():
    model, inputs = tiny_sd3(), sd3_inputs(2, 8, 8)
    model.set_attn_processor(ManualAttention())
    be = specdiff_fx.backend(inductor=False)
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="matmul"), torch.no_grad():
        out = torch.compile(model, backend=be)(**inputs).sample
        torch.testing.assert_close(out, model(**inputs).sample)
    assert be.records[-1].status == "fallback" and "matmul" in be.records[-1].reason


# -- state ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fresh():
    """A generation on a freshly compiled model (new model object: a runtime with no history),
    what the state tests compare with: ``euler`` of ``tiny_sd3()`` on ``sd3_inputs(2, 8, 8)``."""
    with torch.no_grad():
        return euler(compiled(tiny_sd3()), sd3_inputs(2, 8, 8))


def test_interrupted_generation_leaves_no_trace(fresh):
    def stop(i):
        if i == 5:
            raise KeyboardInterrupt

    model = tiny_sd3()
    cm = compiled(model)
    with torch.no_grad():
        with pytest.raises(KeyboardInterrupt):
            euler(cm, sd3_inputs(2, 8, 8, seed=9), steps=10, on_step=stop)
        euler(cm, sd3_inputs(2, 8, 8, seed=7), steps=3)  # abandoned after a few steps
        after = euler(cm, sd3_inputs(2, 8, 8))
    torch.testing.assert_close(after, fresh)


def test_explicit_reset_restarts_the_generation():
    model, inputs = tiny_sd3(), sd3_inputs(2, 8, 8)
    cm = compiled(model)
    with torch.no_grad():
        a = euler(cm, inputs, sigmas=torch.linspace(0.9, 0, 9))
        specdiff_fx.reset()  # same start sigma: only reset() tells a new generation apart here
        rep_before = specdiff_fx.last_generation()
        b = euler(cm, inputs, sigmas=torch.linspace(0.9, 0, 9))
    assert specdiff_fx.last_generation() is not rep_before
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("change", ["load_state_dict", "mul_"])
def test_weights_changed_in_place_start_a_new_generation(change):
    """Weights changed in place in the middle of a generation (``load_state_dict`` of another
    checkpoint, an in-place edit of one block): Dynamo passes the same tensors, so nothing
    recompiles, but every cache of the generation was computed under the old weights. The call
    after the change starts a new generation, as ``specdiff_fx.reset()`` would, with a note
    (before, the generation went on from its stale caches: cached calls returned the old model's
    outputs)."""
    model, inputs = tiny_flux(0), flux_inputs(2, 4, 4)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    other = tiny_flux(7).state_dict()

    def edit(reset):
        def on_step(i):
            if i == 4:  # FAST's fixed schedule caches at this step
                if change == "load_state_dict":
                    model.load_state_dict(other)
                else:
                    for p in model.transformer_blocks[0].parameters():
                        p.mul_(1.5)
                if reset:
                    specdiff_fx.reset()
        return on_step

    cm = compiled(model)
    runs = []
    with torch.no_grad():
        for reset in (False, True):
            with specdiff_fx.track() as tracked:
                runs.append(euler(cm, inputs, on_step=edit(reset)))
            model.load_state_dict(original)
            reports = tracked.reports
            assert [len(r.main_steps) for r in reports] == [4, 4]
            assert any("changed since generation" in n for n in reports[1].notes) != reset
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


def test_weights_made_under_inference_mode_are_noted(caplog):
    """Weights created under ``torch.inference_mode()`` keep no version counter, so the stamp
    cannot see them changed in place: the first call says so (once), and generations still
    run and cache."""
    with torch.inference_mode():
        model = tiny_flux(0)
    assert next(model.parameters()).is_inference()
    cm = compiled(model)
    with torch.inference_mode(), caplog.at_level("INFO", logger="specdiff_fx"):
        euler(cm, flux_inputs(2, 4, 4))
        euler(cm, flux_inputs(2, 4, 4))
    assert sum("inference tensors" in r.getMessage() for r in caplog.records) == 1
    assert "cached" in [s.kind for s in specdiff_fx.last_generation().main_steps]


def test_two_models_interleaved_equal_each_alone():
    m1, m2 = tiny_sd3(1), tiny_sd3(2)
    i1, i2 = sd3_inputs(2, 8, 8, seed=1), sd3_inputs(2, 8, 12, seed=2)
    torch._dynamo.reset()
    c1 = torch.compile(m1, backend=specdiff_fx.backend(**FAST))
    c2 = torch.compile(m2, backend=specdiff_fx.backend(**FAST))
    steps = 10
    sig = torch.linspace(1, 0, steps + 1)
    with torch.no_grad():
        alone = [euler(c1, i1, steps), euler(c2, i2, steps)]
        x = [i1["hidden_states"].clone(), i2["hidden_states"].clone()]
        for i in range(steps):  # call by call
            for j, (c, inp) in enumerate(((c1, i1), (c2, i2))):
                t = torch.full((2,), float(sig[i]) * 1000)
                x[j] = x[j] + (sig[i + 1] - sig[i]) * c(**dict(inp, hidden_states=x[j], timestep=t)).sample
    torch.testing.assert_close(x[0], alone[0])
    torch.testing.assert_close(x[1], alone[1])


def test_two_models_in_two_threads():
    """Documented: one compiled model per thread is safe."""
    models = [tiny_sd3(1), tiny_flux(2)]
    inputs = [sd3_inputs(2, 8, 8, seed=1), flux_inputs(1, 4, 4, seed=2)]
    torch._dynamo.reset()
    cms = [torch.compile(m, backend=specdiff_fx.backend(**FAST)) for m in models]
    with torch.no_grad():
        alone = [euler(c, i) for c, i in zip(cms, inputs)]
    results = [None, None]

    def work(j):
        with torch.no_grad():
            results[j] = euler(cms[j], inputs[j])

    threads = [threading.Thread(target=work, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r, a in zip(results, alone):
        torch.testing.assert_close(r, a)


def test_shape_change_inside_a_generation_resets_instead_of_reusing():
    model = tiny_sd3()
    torch._dynamo.reset()  # dynamic from the start: one graph, one runtime per shape
    cm = torch.compile(model, backend=specdiff_fx.backend(**FAST), dynamic=True)
    small, large, other = sd3_inputs(2, 8, 8, seed=1), sd3_inputs(2, 8, 12, seed=1), sd3_inputs(2, 8, 8, seed=2)
    sig = torch.linspace(1, 0, 11)
    with specdiff_fx.track() as tracker, torch.no_grad():
        euler(cm, small, sigmas=sig[:6])  # steps 0-4 at one size
        euler(cm, large, sigmas=sig[5:8])  # the caller switches size mid-generation
        euler(cm, other, sigmas=sig[7:])  # ... and back, on a latent the first size's generation never had
    first, switched, back = tracker.reports
    # each part started over: step 0, full, at its first sigma, with the first size's runtime
    # serving the last part again (a latent that continues its generation resumes it:
    # test_specialize_shapes.py and test_runtime.py cover that)
    for rep, sigma, tokens in ((first, 1.0, 16), (switched, 0.5, 24), (back, 0.3, 16)):
        assert rep.steps[0].kind == "full" and rep.steps[0].step == 0 and abs(rep.steps[0].sigma - sigma) < 1e-6
        assert rep.num_image_tokens == tokens
    assert len(back.main_steps) == 3


def test_specialisations_of_a_dynamic_graph_are_bounded(monkeypatch):
    """A graph with dynamic shapes compiles each new shape (and each value of a number it reads:
    a LoRA scale passed per call) apart; they were kept for good, one runtime each. The least
    recently used past ``MAX_SPECIALISATIONS`` is dropped with a warning, and a shape seen
    again compiles again and still gives its images."""
    import gc

    from specdiff_fx import dynamo_backend
    from specdiff_fx.runtime.core import _LIVE

    monkeypatch.setattr(dynamo_backend, "MAX_SPECIALISATIONS", 2)
    monkeypatch.setattr(dynamo_backend, "_WARNED", set())
    model = tiny_sd3()
    torch._dynamo.reset()
    be = specdiff_fx.backend(**FAST)
    cm = torch.compile(model, backend=be, dynamic=True)
    sizes = [(8, 8), (8, 12), (12, 8), (8, 8)]
    gc.collect()
    before = {id(rt) for rt in list(_LIVE)}
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="least recently used are dropped"):
        outs = [euler(cm, sd3_inputs(2, h, w, seed=1)) for h, w in sizes]
    gc.collect()
    assert len(be.runtimes) <= 2 and len([rt for rt in list(_LIVE) if id(rt) not in before]) <= 2
    torch.testing.assert_close(outs[3], outs[0], rtol=0, atol=0)


def test_under_freezing_a_graph_compiled_again_is_never_served_an_old_runtime():
    """With ``torch._inductor.config.freezing`` the compiled variants hold the weights as
    constants; ``torch._dynamo.reset()`` after a weight change must give a graph compiled with
    the new ones. A runtime built before for an equal graph was served again (the fix for threads
    racing the first compile, and shapes seen before): the old weights, silently."""
    import torch._inductor.config as inductor_config

    model, inputs = tiny_sd3(), sd3_inputs(2, 8, 8)
    gms = []

    def grab(gm, example_inputs):
        gms.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=grab)(**inputs)
    gm, example = gms[0]
    be, plain = specdiff_fx.backend(inductor=True), specdiff_fx.backend(inductor=False)
    assert be._shape_key(gm, example) is not None
    with inductor_config.patch(freezing=True):
        assert be._shape_key(gm, example) is None and plain._shape_key(gm, example) is not None
    assert be._shape_key(gm, example) is not None


# -- numerics, grad, recompiles --------------------------------------------------------------

def test_nan_latents_do_not_poison_later_generations(fresh):
    model, inputs = tiny_sd3(), sd3_inputs(2, 8, 8)
    cm = compiled(model)
    bad = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    bad["hidden_states"][0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        out_bad = euler(cm, bad)
        assert torch.isnan(out_bad).any()
        good = euler(cm, inputs)
    assert torch.isfinite(good).all()
    torch.testing.assert_close(good, fresh)


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype, family):
    """Half precision caches as float32 does (in float16 diffusers' FLUX blocks clip their outputs
    with ``Tensor.clip``, a per-token op like ``clamp``)."""
    model, inputs = (tiny_sd3(), sd3_inputs(2, 8, 8)) if family == "sd3" else (tiny_flux(), flux_inputs(2, 4, 4))
    model = model.to(dtype)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    cm = compiled(model)
    with torch.no_grad():
        out = euler(cm, inputs)
        ref = euler(model, inputs)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max() < 0.5
    assert specdiff_fx.last_record().status == "specdiff", specdiff_fx.last_record().reason
    assert specdiff_fx.last_generation().count("cached") > 0


PIECES = [{"score": "attention"}, {"blend": True}, {"blend": True, "blend_mode": "taylor", "reuse_mass": 0.3},
          {"speculative_steps": 2}, {"kv_extrapolation": False}, {"hindsight": False}, {"sparse_calls": 2},
          {"score": "attention", "speculative_steps": 2, "blend": True, "kv_extrapolation": False}]  # as published


@pytest.mark.parametrize("family,options", [("sd3", o) for o in PIECES] + [("flux", PIECES[0]), ("flux", PIECES[-1])],
                         ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={x}" for k, x in v.items()))
def test_each_optional_piece_runs_through_the_error_controller(family, options):
    """SpecDiff's optional pieces (attention score, the blend tiers, the speculative run, ...)
    with the default controller: full, sparse and skipped calls, and a full call after a
    skipped one (where ``score="attention"`` once raised), stay finite and near eager."""
    model, inputs = (tiny_sd3(), sd3_inputs(2, 8, 8)) if family == "sd3" else (tiny_flux(), flux_inputs(2, 4, 4))
    torch._dynamo.reset()
    cm = torch.compile(model, backend=specdiff_fx.backend(inductor=False, tolerance=0.3, **options))
    with torch.no_grad():
        out = euler(cm, inputs, steps=12)
        ref = euler(model, inputs, steps=12)
    kinds = [s.kind for s in specdiff_fx.last_generation().main_steps]
    assert {"full", "cached"} <= set(kinds)
    if options.get("sparse_calls", 1) is not None:
        assert "full" in [b for a, b in zip(kinds, kinds[1:]) if a == "skipped"], kinds
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.5 * ref.abs().max()


def test_caches_hold_no_autograd_state():
    model, inputs = tiny_sd3(), sd3_inputs(2, 8, 8)
    be = specdiff_fx.backend(**FAST)
    torch._dynamo.reset()
    cm = torch.compile(model, backend=be)
    with torch.inference_mode():
        euler(cm, inputs)
    with torch.no_grad():  # caches made under inference_mode are updated under no_grad
        euler(cm, inputs)
    rt = be.runtimes[-1]
    tensors = [t for s in rt.branches.values() for t in [*s.kv.kv, *s.kv.prev, s.tokens.outputs]]
    assert tensors and not any(t.requires_grad or t.grad_fn is not None for t in tensors)
    assert not any(t.is_inference() for t in tensors)


def test_a_generation_causes_no_recompiles():
    from torch._dynamo.utils import counters

    model, inputs = tiny_sd3(), sd3_inputs(2, 8, 8)
    be = specdiff_fx.backend(**FAST)
    torch._dynamo.reset()
    counters.clear()
    cm = torch.compile(model, backend=be)
    with torch.no_grad():
        euler(cm, inputs)
        frames, records = counters["stats"]["unique_graphs"], len(be.records)
        compiles = specdiff_fx.last_generation().compiles
        euler(cm, sd3_inputs(2, 8, 8, seed=5), steps=12)
    assert counters["stats"]["unique_graphs"] == frames == 1 and len(be.records) == records == 1
    rep = specdiff_fx.last_generation()
    assert rep.compiles == compiles == 2 and rep.compile_seconds > 0
