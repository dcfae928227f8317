"""Reused outputs carried along each token's last two computed outputs (``reuse_extrapolation``).

Without guidance a reused token's output ``F1`` becomes ``F1 + lam * r * (F1 - F2)`` (``r`` the
first-order ratio of sigma); under guidance the tokens are reused as they are. Checked on the
weights the graphs read, and through generations of the backend on tiny SD3: without guidance
the same calls give another image, with batched CFG halves or a second (true CFG) branch the
very same image as plain reuse.
"""

import pytest
import torch

import specdiff_fx
from oracle import sd3_inputs, tiny_sd3
from specdiff_fx import SpecDiffConfig, schedule


def test_the_option():
    assert SpecDiffConfig().reuse_extrapolation == SpecDiffConfig.__dataclass_fields__["reuse_extrapolation"].default
    assert SpecDiffConfig(reuse_extrapolation=1).reuse_extrapolation == 1
    for bad in (-0.1, 1.5, "half", True):
        with pytest.raises(ValueError, match="reuse_extrapolation"):
            SpecDiffConfig.from_options({"reuse_extrapolation": bad})


def test_weights_carry_the_reused_tokens_the_share_reach_of_the_first_order_step():
    # token 0: computed at 0.6 and 0.8 (r = (0.6 - 0.5) / 0.2 = 0.5); token 1: once only (r = 0);
    # token 2: r clamped to 1.5
    sigmas = torch.tensor([[[0.6, 0.6, 0.6]], [[0.8, 0.6, 0.61]]])  # [2, B=1, N=3], newest first
    w = schedule.taylor_weights(None, sigmas, 0.5, 2, reach=0.4)
    r = torch.tensor([0.5, 0.0, 1.5])
    torch.testing.assert_close(w[0], torch.stack([1 + 0.4 * r, -0.4 * r], dim=-1))
    assert torch.equal(schedule.taylor_weights(None, sigmas, 0.5, 2)[0],
                       torch.tensor([[1.0, 0.0]] * 3))  # reach 0: plain reuse
    tier = torch.tensor([[1, 2, 3]])
    w = schedule.taylor_weights(tier, sigmas, 0.5, 2, reach=0.4)
    assert torch.equal(w[0, 0], torch.zeros(2))  # computed: overwritten by the fresh output
    torch.testing.assert_close(w[0, 1], torch.tensor([1.0, 0.0]))  # one computed output: r = 0
    torch.testing.assert_close(w[0, 2], torch.tensor([2.5, -1.5]))  # C3: the whole first-order step


OPTS = dict(inductor=False, controller="fixed", warmup_steps=2, refresh_at=(0.5,), cache_ratio=0.5)


def _generate(backend, twins=False, true_cfg=False, steps=8):
    """An Euler generation of tiny SD3: plain (two distinct samples), batched CFG (``twins``: the
    batch's halves start from one latent, guidance 4) or true CFG (two calls per step)."""
    torch._dynamo.reset()
    model = torch.compile(tiny_sd3(0), backend=backend, fullgraph=True, dynamic=False)
    inputs = sd3_inputs(2, 8, 8, seed=3)
    x = inputs.pop("hidden_states")
    if twins or true_cfg:
        x = x[:1].expand(2, -1, -1, -1).clone() if twins else x[:1]
    uncond = {k: v[1:] for k, v in inputs.items()} if true_cfg else None
    cond = {k: v[:1] for k, v in inputs.items()} if true_cfg else inputs
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for i in range(steps):
            t = float(sigmas[i]) * 1000

            def call(kw):
                return model(hidden_states=x, **{**kw, "timestep": torch.full((x.shape[0],), t)}).sample
            v = call(cond)
            if twins:
                v = v[1:] + 4 * (v[:1] - v[1:])
                v = v.expand(2, -1, -1, -1)
            elif true_cfg:
                u = call(uncond)
                v = u + 4 * (v - u)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x, backend.runtimes[-1]


def _kinds(rt):
    return [r.kind for r in rt.report.steps]


def test_without_guidance_the_reused_tokens_move():
    plain, rt0 = _generate(specdiff_fx.backend(**OPTS, reuse_extrapolation=0))
    moved, rt1 = _generate(specdiff_fx.backend(**OPTS, reuse_extrapolation=1))
    assert _kinds(rt0) == _kinds(rt1) and "cached" in _kinds(rt0)
    err = ((moved - plain).norm() / plain.norm()).item()
    assert 0 < err < 0.5


@pytest.mark.parametrize("mode", ["twins", "true_cfg"])
def test_under_guidance_the_tokens_are_reused_as_they_are(mode):
    plain, rt0 = _generate(specdiff_fx.backend(**OPTS, reuse_extrapolation=0), **{mode: True})
    same, rt1 = _generate(specdiff_fx.backend(**OPTS, reuse_extrapolation=1), **{mode: True})
    assert _kinds(rt0) == _kinds(rt1) and "cached" in _kinds(rt0)
    if mode == "true_cfg":
        assert len(rt1.generation.branches) == 2
    else:
        assert rt1.generation.branches[0].state.groups is not None
    assert torch.equal(same, plain)


def test_skipped_calls_of_the_error_controller_read_the_carried_weights(monkeypatch):
    """Under the default controller the skipped calls (no token computed) carry every token too:
    their history weights are ``[1 + lam r, -lam r]`` (affine: each row sums to 1), not one-hot,
    and the generation stays near eager's."""
    from specdiff_fx.runtime.executor import GraphExecutor
    from specdiff_fx.signature import VariantKey
    from test_hardening import euler

    seen = []
    run_sparse = GraphExecutor.run_sparse

    def spy(self, args, key, inputs):
        seen.append((key, inputs.weights.clone()))
        return run_sparse(self, args, key, inputs)

    monkeypatch.setattr(GraphExecutor, "run_sparse", spy)
    model, inputs = tiny_sd3(), sd3_inputs(2, 8, 8)
    torch._dynamo.reset()
    cm = torch.compile(model, backend=specdiff_fx.backend(inductor=False, tolerance=0.3, reuse_extrapolation=1.0))
    with torch.no_grad():
        out, ref = euler(cm, inputs, steps=12), euler(model, inputs, steps=12)
    skips = [w for key, w in seen if key == VariantKey.skip()]
    assert skips and any((w[..., 1] < 0).any() for w in skips), "no skipped call carried a token"
    for w in skips:
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))
        assert (w[..., 0] >= 1).all() and (w[..., 1] <= 0).all()
    assert torch.isfinite(out).all() and (out - ref).abs().max() < 0.5 * ref.abs().max()
