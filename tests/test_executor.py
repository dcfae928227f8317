"""The executor's bindings: each variant's added inputs and extra outputs resolved to positions
once, on real Dynamo graphs of tiny SD3 and FLUX (plain-FX variants)."""

import pytest
import torch

from specdiff_fx import SpecDiffConfig, analyze_dit
from specdiff_fx.runtime import GraphExecutor
from specdiff_fx.runtime.executor import Binding, SparseInputs
from specdiff_fx.signature import ContextMode, Port, Role, VariantKey, kv_ports


def sparse_inputs(ex: GraphExecutor, plan, full_out, k: int, k_txt: int | None) -> SparseInputs:
    """What the runtime would pass after one full call: the call's K/V as caches (and as the
    previous ones), its tokens as the history, and the first tokens as the subset."""
    b, n = plan.batch, plan.num_image_tokens
    kv = [t.clone() for t in full_out.kv]
    text = None if full_out.text is None else [None if t is None else t.clone() for t in full_out.text]
    history = torch.stack([full_out.tokens, full_out.tokens])
    weights = torch.zeros(b, n, 2)
    weights[..., 0] = 1
    inputs = SparseInputs(torch.arange(k).expand(b, k).contiguous(), history, weights, kv,
                          [t.clone() for t in kv], torch.zeros(b, n))
    if k_txt is not None:
        m = plan.num_text_tokens
        inputs.text, inputs.text_prev = text, [None if t is None else t.clone() for t in text]
        inputs.text_ratio, inputs.text_idx = torch.zeros(b, m), torch.arange(k_txt).expand(b, k_txt).contiguous()
    return inputs


def by_port(v, inputs: SparseInputs, attentions: int) -> dict:
    """The added inputs' values looked up by port (what the runtime did before bindings)."""
    lists = {Role.KV: inputs.kv, Role.KV_PREV: inputs.kv_prev, Role.TEXT_KV: inputs.text,
             Role.TEXT_KV_PREV: inputs.text_prev}
    single = {Role.HISTORY: inputs.history, Role.WEIGHTS: inputs.weights, Role.IDX: inputs.idx,
              Role.KV_RATIO: inputs.ratio, Role.TEXT_RATIO: inputs.text_ratio,
              Role.TEXT_TOKEN_RATIO: inputs.text_ratio, Role.TEXT_IDX: inputs.text_idx}
    return {i.port: lists[i.port.role][kv_ports(i.port.role, attentions).index(i.port)] if i.port.role in lists
            else single[i.port.role] for i in v.new_inputs}


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_bindings_match_the_ports(captured, name):
    c = captured(name)
    plan = analyze_dit(c.gm)
    cfg = SpecDiffConfig(inductor=False)
    ex = GraphExecutor(c.gm, c.example_inputs, plan, cfg)
    attn = len(plan.attention)
    args = list(c.example_inputs)
    with torch.no_grad():
        full = ex.run_full(args)
        user, extras = ex.full.run(args, {})
    b = ex.binding(ex.full)
    assert b.inputs == () and len(b.kv) == 2 * attn and b.user == ex.full.num_user_outputs
    # the full variant's outputs, by position, are those its ports name
    torch.testing.assert_close(full.tokens, extras[Port(Role.TOKENS)])
    for t, p in zip(full.kv, kv_ports(Role.KV, attn)):
        torch.testing.assert_close(t, extras[p])
    assert full.text is not None and [t is None for t in full.text] == \
        [p not in extras for p in kv_ports(Role.TEXT_KV, attn)]

    k = cfg.num_computed(plan.num_image_tokens)
    k_txt = plan.num_text_tokens // 2
    key = VariantKey.sparse(k, ContextMode.SUBSET, True, k_txt=k_txt)
    v = ex.variant(key)
    bs = ex.binding(v)
    assert len(bs.inputs) == len(v.new_inputs) and bs.kv == () and bs.text is None
    for (field, slot), spec in zip(bs.inputs, v.new_inputs):  # every per-attention input has its slot
        assert (slot is None) == (spec.port.attention is None)
    # the same call through the bindings and through the ports: the same outputs and cache writes
    a, ref = sparse_inputs(ex, plan, full, k, k_txt), sparse_inputs(ex, plan, full, k, k_txt)
    with torch.no_grad():
        got = ex.run_sparse(args, key, a)
        want_user, want_extras = v.run(args, by_port(v, ref, attn), check_values=False)
    torch.testing.assert_close(got.user, want_user)
    torch.testing.assert_close(got.tokens, want_extras[Port(Role.TOKENS)])
    for x, y in zip(a.kv + [t for t in a.text if t is not None], ref.kv + [t for t in ref.text if t is not None]):
        torch.testing.assert_close(x, y)
    assert got.kv == a.kv and got.kv is not a.kv

    # a value the variant needs and the runtime did not give: a clear error naming the input
    a.ratio = None
    with pytest.raises(KeyError, match="specdiff_kv_ratio"):
        ex.run_sparse(args, key, a)


def test_a_binding_refuses_an_input_the_runtime_never_passes(captured):
    c = captured("sd3")
    plan = analyze_dit(c.gm)
    ex = GraphExecutor(c.gm, c.example_inputs, plan, SpecDiffConfig(inductor=False))
    v = ex.variant(VariantKey.skip())
    odd = type(v.new_inputs[0])(Port(Role.BASE), (1,), torch.float32, torch.device("cpu"))
    v.new_inputs = (*v.new_inputs, odd)
    with pytest.raises(KeyError, match="specdiff_base"):
        Binding.of(v, len(plan.attention))


def test_parameters_are_passed_as_they_are_and_other_inputs_made_contiguous(captured):
    from specdiff_fx.variants import _loose_inputs

    c = captured("sd3")
    names = [p.name for p in c.gm.graph.find_nodes(op="placeholder")]
    params = [i for i, n in enumerate(names) if "_parameters_" in n]
    assert params and len(params) < len(names)
    args = list(c.example_inputs)
    loose = _loose_inputs(c.gm, args)
    assert set(loose) == set(range(len(names))) - set(params)  # the user's inputs, the buffers
    # a parameter that is not contiguous from the start (a tied, transposed weight) is copied too
    j = next(i for i in params if args[i].dim() == 2 and args[i].shape[0] != args[i].shape[1])
    args[j] = args[j].t().contiguous().t()
    assert not args[j].is_contiguous() and j in _loose_inputs(c.gm, args)
    plan = analyze_dit(c.gm)
    ex = GraphExecutor(c.gm, c.example_inputs, plan, SpecDiffConfig(inductor=False))
    with torch.no_grad():
        want = ex.run_full(list(c.example_inputs)).user
        ex.full._loose = None  # as on a first call with that weight
        torch.testing.assert_close(ex.run_full(args).user, want)


def test_counting_flops_installs_no_module_hooks_other_threads_would_run():
    """Counting a variant's FLOPs (on the thread that builds it, maybe while another thread serves a
    compiled model) installs no global module hooks, which every thread's module calls would run
    (and a thread inside Dynamo would trace); the total is counted all the same."""
    from torch.nn.modules import module

    from specdiff_fx.variants import count_flops, flop_counter

    lin = torch.nn.Linear(8, 4)
    with flop_counter() as counter:
        hooks = (len(module._global_forward_pre_hooks), len(module._global_forward_hooks))
        lin(torch.randn(3, 8))
    assert hooks == (0, 0)
    assert counter.get_total_flops() == 2 * 3 * 8 * 4
    assert count_flops(torch.fx.symbolic_trace(lin), [torch.randn(3, 8)]) == 2 * 3 * 8 * 4
