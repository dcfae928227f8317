"""The general layout rules the newer DiT families needed, each on a small hand-written graph.

Every rule is checked where it holds (the layout it gives, the gathers and rewrites it asks
for) and where it must refuse (a :class:`LayoutError`, so the model falls back). The
families' real graphs exercise them end to end in ``test_families.py``.
"""

import dataclasses
import math
import operator

import pytest
import torch
import torch.nn.functional as F

from specdiff_fx import ops
from specdiff_fx.layout import Layout, LayoutError, Seg, op_name, propagate_layouts
from specdiff_fx.plan import DiTPlan, stream_segments

B, N, M, D, H = 2, 6, 3, 8, 2


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def layouts(fn, *inputs, stream=None, n=N):
    """Propagate through Dynamo's graph of ``fn`` from its first input (the token stream
    ``[B, n(+...), D]``) to its last node; layouts by node, and the graph."""
    store = {}

    def grab(gm, example_inputs):
        store["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_Fn(fn), backend=grab, fullgraph=True, dynamic=False)(*inputs)
    gm = store["gm"]
    start = next(p for p in gm.graph.find_nodes(op="placeholder") if p.name == "l_args_0_")
    end = [node for node in gm.graph.nodes if node.op not in ("placeholder", "output")][-1]
    infos = propagate_layouts(gm.graph, start, end, n, stream)
    return infos, gm


def only(infos, name):
    """The layout info of the one node whose op is ``name``."""
    hits = [info for node, info in infos.items() if op_name(node) == name]
    assert len(hits) == 1, (name, len(hits))
    return hits[0]


def heads(x):
    return x.unflatten(-1, (H, -1)).transpose(1, 2)  # [B, S, D] -> [B, H, S, d]


IMG = Layout(1, (Seg("img", N),))
JOINT = Layout(2, (Seg("txt", M), Seg("img", N)))


# -- attention masks ----------------------------------------------------------------------


def joint_attention(x, txt, mask):
    seq = heads(torch.cat([txt, x], dim=1))
    return F.scaled_dot_product_attention(seq, seq, seq, attn_mask=mask)


def test_a_mask_with_one_row_per_query_is_gathered_with_the_queries_and_its_key_columns_follow_the_keys():
    mask = torch.ones(B, 1, M + N, M + N, dtype=torch.bool)
    infos, gm = layouts(joint_attention, torch.randn(B, N, D), torch.randn(B, M, D), mask)
    info = only(infos, "sdpa")
    assert info.layout == JOINT
    assert info.gathers == ((("kwargs", "attn_mask"), JOINT),)  # rows: the computed queries
    assert info.rewrite == ("mask_keys", ("kwargs", "attn_mask"), JOINT.with_axis(3))  # columns: the keys


def test_a_key_only_mask_has_no_rows_to_gather():
    """Qwen-Image's text mask ``[B, 1, 1, S]``: broadcast over the queries; its key columns
    follow the keys (the subset's until the attention rewrite widens them back)."""
    infos, _ = layouts(joint_attention, torch.randn(B, N, D), torch.randn(B, M, D),
                       torch.ones(B, 1, 1, M + N, dtype=torch.bool))
    assert only(infos, "sdpa").gathers == ()
    assert only(infos, "sdpa").rewrite == ("mask_keys", ("kwargs", "attn_mask"), JOINT.with_axis(3))


def test_a_mask_computed_from_image_tokens_is_refused():
    def from_tokens(x, txt):
        seq = heads(torch.cat([txt, x], dim=1))
        mask = seq.sum(-1, keepdim=True) > 0  # [B, H, S, 1]: depends on the tokens' values
        return F.scaled_dot_product_attention(seq, seq, seq, attn_mask=mask)

    with pytest.raises(LayoutError, match="mask computed from image tokens"):
        layouts(from_tokens, torch.randn(B, N, D), torch.randn(B, M, D))

    def mask_from_tokens(x, txt):
        seq = heads(torch.cat([txt, x], dim=1))
        return F.scaled_dot_product_attention(seq, seq, seq, attn_mask=seq[:1, :1] > 0)  # [1, 1, S, d=S]

    with pytest.raises(LayoutError, match="mask computed from image tokens"):
        layouts(mask_from_tokens, torch.randn(B, N, 2 * (M + N)), torch.randn(B, M, 2 * (M + N)))


def test_received_attention_honours_the_mask():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, H, M + N, 4, generator=g), torch.randn(B, H, M + N, 4, generator=g)
    mask = torch.ones(B, 1, M + N, M + N, dtype=torch.bool)
    mask[0, :, :, 1] = False  # a padded text key
    mask[0, :, 1, :] = False  # ... that is also a query attending nowhere (a fully masked row)
    got = ops.received_attention(q, k, M, N, 0, mask=mask)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(4)
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(got, probs.mean(1).sum(1)[:, M:])
    additive = torch.zeros(B, 1, M + N, M + N).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(ops.received_attention(q, k, M, N, 0, mask=additive), got)
    assert not torch.allclose(ops.received_attention(q, k, M, N, 0), got)  # the mask matters


# -- query-only (cross) attention -------------------------------------------------------


def test_cross_attention_to_text_keys_keeps_the_query_layout():
    """Wan: image queries, text keys and values; no K/V of image tokens involved."""

    def cross(x, txt):
        return F.scaled_dot_product_attention(heads(x), heads(txt), heads(txt))

    infos, gm = layouts(cross, torch.randn(B, N, D), torch.randn(B, M, D))
    assert only(infos, "sdpa").layout == IMG.with_axis(2)
    sdpa = next(node for node in infos if op_name(node) == "sdpa")
    assert sdpa.kwargs.get("key", sdpa.args[1]) not in infos  # the keys carry no image tokens


def test_keys_may_hold_context_tokens_the_queries_lack():
    """FLUX.2 Klein KV: cached reference-image K/V spliced between the text and image keys."""

    def spliced(x, txt, ref):
        q = heads(torch.cat([txt, x], dim=1))
        k = heads(torch.cat([txt, ref, x], dim=1))
        return F.scaled_dot_product_attention(q, k, k)

    infos, gm = layouts(spliced, torch.randn(B, N, D), torch.randn(B, M, D), torch.randn(B, 4, D))
    sdpa = next(node for node in infos if op_name(node) == "sdpa")
    assert infos[sdpa].layout == JOINT  # the output follows the queries
    assert infos[sdpa.kwargs.get("key", sdpa.args[1])].layout == Layout(2, (Seg("txt", M), Seg("txt", 4), Seg("img", N)))

    def two_streams(x, txt):
        q = heads(torch.cat([txt, x], dim=1))
        k = heads(torch.cat([x, txt], dim=1))
        v = heads(torch.cat([txt, x], dim=1))
        return F.scaled_dot_product_attention(q, k, v)

    with pytest.raises(LayoutError, match="key and value"):
        layouts(two_streams, torch.randn(B, N, D), torch.randn(B, M, D))


def test_attention_whose_keys_carry_image_tokens_but_queries_do_not_is_refused():
    def reverse(x, txt):
        return F.scaled_dot_product_attention(heads(txt), heads(x), heads(x))

    with pytest.raises(LayoutError, match="queries do not"):
        layouts(reverse, torch.randn(B, N, D), torch.randn(B, M, D))


# -- complex views (Qwen-Image's RoPE) --------------------------------------------------


def test_complex_views_keep_the_token_axis():
    def rope(x, freqs):
        z = torch.view_as_complex(x.float().reshape(B, N, H, -1, 2))
        return torch.view_as_real(z * freqs).flatten(3)

    freqs = torch.polar(torch.ones(N, 1, D // H // 2), torch.randn(N, 1, D // H // 2))
    infos, _ = layouts(rope, torch.randn(B, N, D), freqs)
    assert only(infos, "view_as_complex").layout == IMG
    mul = only(infos, "mul")
    assert mul.layout == IMG and mul.gathers == ((("args", 1), IMG),)  # one frequency row per token
    assert only(infos, "view_as_real").layout == IMG and only(infos, "flatten").layout == IMG

    def over_tokens(x):  # the token axis as the complex pair axis
        return torch.view_as_complex(x.transpose(1, 2).contiguous())

    with pytest.raises(LayoutError, match="view_as_complex over the token axis"):
        layouts(over_tokens, torch.randn(B, 2, D), n=2)


# -- dtype-only operands ------------------------------------------------------------------


def test_type_as_takes_only_a_dtype_from_its_second_operand():
    """Wan: ``attn_out.type_as(query)`` with ``query`` of another rank and token axis."""

    def cast(x):
        q = heads(x)  # [B, H, N, d]: token axis 2
        return x.half().type_as(q) + x.half().to(q)

    infos, _ = layouts(cast, torch.randn(B, N, D))
    assert only(infos, "type_as").layout == IMG and only(infos, "type_as").gathers == ()
    assert only(infos, "to").layout == IMG and only(infos, "add").layout == IMG


# -- fresh tensors written in place (Wan's RoPE) ------------------------------------------


def test_empty_like_and_setitem_that_keep_the_token_axis_whole():
    def rope(x, cos):
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        out = torch.empty_like(x)
        out[..., 0::2] = x1 * cos
        out[..., 1::2] = x2 * cos
        return out + 1

    infos, gm = layouts(rope, torch.randn(B, N, D), torch.randn(1, N, D // 2))
    assert only(infos, "empty_like").layout == IMG
    setitems = [n for n in gm.graph.nodes if n.target is operator.setitem]
    assert len(setitems) == 2 and all(infos[n].layout is None and infos[n].gathers == () for n in setitems)
    assert only(infos, "add").layout == IMG


@pytest.mark.parametrize("case", ["part_of_the_tokens", "into_a_non_token_tensor", "unaligned_value"])
def test_setitem_that_would_not_be_exact_on_a_subset_is_refused(case):
    def part(x):
        out = torch.zeros_like(x)
        out[:, :2] = x[:, :2]
        return out

    def into_buffer(x, buf):
        buf[:, :, 0] = x.sum(-1)
        return buf

    def unaligned(x, full):
        out = torch.empty_like(x)
        out[...] = full  # a full-length tensor with no token layout of its own
        return out + x

    fn, extra = {"part_of_the_tokens": (part, ()), "into_a_non_token_tensor": (into_buffer, (torch.zeros(B, N, 2),)),
                 "unaligned_value": (unaligned, (torch.randn(B, N, D),))}[case]
    with pytest.raises(LayoutError):
        layouts(fn, torch.randn(B, N, D), *extra)


# -- context tokens inside the image stream (FLUX.2's reference images) -----------------


def test_stream_segments_from_position_ids():
    ids = torch.zeros(N + 4, 4)
    ids[N:, 0] = 10  # a reference image: time coordinate 10
    assert stream_segments(ids, 0) == (Seg("img", N), Seg("txt", 4))
    assert stream_segments(ids[None].expand(B, -1, -1), 0) == (Seg("img", N), Seg("txt", 4))  # batched ids
    ids[:2, 0] = 20  # prepended too
    assert stream_segments(ids, 0) == (Seg("txt", 2), Seg("img", N - 2), Seg("txt", 4))


def test_a_stream_with_context_tokens_propagates_through_joint_attention():
    stream = Layout(1, (Seg("img", N), Seg("txt", 4)))

    def block(x, txt):
        seq = heads(torch.cat([txt, x], dim=1))
        return F.scaled_dot_product_attention(seq, seq, seq).transpose(1, 2).flatten(2)[:, M:]

    infos, _ = layouts(block, torch.randn(B, N + 4, D), torch.randn(B, M, D), stream=stream)
    assert only(infos, "sdpa").layout == Layout(2, (Seg("txt", M), Seg("img", N), Seg("txt", 4)))
    assert only(infos, "getitem").layout == stream  # the text sliced off: image and reference tokens remain
    with pytest.raises(LayoutError, match="one image segment"):
        layouts(block, torch.randn(B, N + 4, D), torch.randn(B, M, D), stream=Layout(1, (Seg("txt", N + 4),)))


def test_stream_matches_checks_a_calls_position_ids_against_the_plan():
    plan = DiTPlan(family="x", batch=B, num_image_tokens=N, width=D, out_channels=4, start="s", end="e", blocks=(),
                   attention=(), side_inputs=(), timestep_input=0, sample_input=0, timestep_per_sigma=1.0,
                   stream=Layout(1, (Seg("img", N), Seg("txt", 4))), context_ids=(1, 0))
    ids = torch.zeros(N + 4, 4)
    ids[N:, 0] = 10
    assert plan.stream_matches([None, ids]) and plan.stream_length == N + 4
    other = torch.zeros(N + 4, 4)
    other[N - 2:, 0] = 10  # same total length, two more reference tokens
    assert not plan.stream_matches([None, other])
    plain = dataclasses.replace(plan, stream=None, num_image_tokens=N + 4)  # compiled without references
    assert plain.stream_matches([None, torch.zeros(N + 4, 4)]) and not plain.stream_matches([None, ids])


def test_restore_stream_puts_context_rows_around_the_image_rows():
    k, c = 2, 3
    subset = torch.arange(B * (k + 4) * c, dtype=torch.float32).reshape(B, k + 4, c)  # [img k, ref 4]
    image = torch.full((B, N, c), -1.0)
    spec = (("img", N), ("txt", 4))
    out = ops.restore_stream(subset, image, spec)
    assert out.shape == (B, N + 4, c)
    torch.testing.assert_close(out[:, :N], image)
    torch.testing.assert_close(out[:, N:], subset[:, k:])
    dropped = ops.restore_stream(subset[:, :k], image, spec, keep_txt=False)  # context caching: not computed
    assert dropped.shape == (B, N + 4, c) and (dropped[:, N:] == 0).all()


def test_text_counts_map_lengths_and_boundaries_onto_the_subset_axis():
    """A text count: ``None`` keeps every text segment whole, 0 drops them, ``k_txt`` keeps that
    many of the one text segment (the old ``keep_txt=True/False`` are ``None``/0)."""
    joint = Layout(1, (Seg("txt", M), Seg("img", N)))
    assert [joint.sub_length(2, t) for t in (None, 0, 1, M)] == [M + 2, 2, 3, 2 + M]
    assert [joint.to_sub(M, 2, t) for t in (None, 0, 1)] == [M, 0, 1]  # FLUX's final slice [:, M:]
    assert joint.to_sub(M + N, 2, 1) == 3
    with pytest.raises(TypeError):
        joint.sub_length(2, True)  # would silently read as one text token
    with pytest.raises(LayoutError):
        joint.sub_length(2, M + 1)
    two = Layout(1, (Seg("txt", M), Seg("img", N), Seg("txt", 4)))
    assert two.sub_length(2, None) == M + 2 + 4 and two.sub_length(2, 0) == 2
    with pytest.raises(LayoutError, match="one text segment"):
        two.sub_length(2, 1)  # which segment's tokens the text index holds is not defined


def test_layout_index_puts_the_text_index_at_its_segment():
    idx, text_idx = torch.tensor([[4, 1], [0, 5]]), torch.tensor([[2], [0]])
    assert ops.layout_index(idx, (("img", N), ("txt", M)), text_idx).tolist() == [[4, 1, N + 2], [0, 5, N]]
    assert ops.layout_index(idx, (("txt", M), ("img", N)), text_idx).tolist() == [[2, M + 4, M + 1], [0, M, M + 5]]
    assert ops.layout_index(idx, (("txt", M),), text_idx).tolist() == text_idx.tolist()
    whole = ops.layout_index(idx, (("txt", M), ("img", N)), True)
    assert whole.tolist() == [[0, 1, 2, M + 4, M + 1], [0, 1, 2, M, M + 5]]
    assert ops.layout_index(idx, (("txt", M), ("img", N)), False).tolist() == [[M + 4, M + 1], [M, M + 5]]


def test_text_start_gives_the_text_stream_a_layout():
    """Traced from the text input too, the text tensors before the joint attention carry
    ``(txt M)``; without it they have none until they meet the image tokens."""
    def fn(x, t):
        t = F.layer_norm(t * 2.0, (D,))
        return torch.cat([t, x], dim=1) + 1.0

    x, t = torch.randn(B, N, D), torch.randn(B, M, D)
    store = {}

    def grab(gm, example_inputs):
        store["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_Fn(fn), backend=grab, fullgraph=True, dynamic=False)(x, t)
    gm = store["gm"]
    start, text = (next(p for p in gm.graph.find_nodes(op="placeholder") if p.name == f"l_args_{i}_") for i in (0, 1))
    end = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    plain = propagate_layouts(gm.graph, start, end, N)
    traced = propagate_layouts(gm.graph, start, end, N, text=text)
    norm = next(n for n in gm.graph.nodes if op_name(n) == "layer_norm")
    assert norm not in plain and traced[norm].layout == Layout(1, (Seg("txt", M),))
    assert plain[end].layout == traced[end].layout == Layout(1, (Seg("txt", M), Seg("img", N)))
