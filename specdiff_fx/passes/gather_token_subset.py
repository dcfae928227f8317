"""Subset variant: run the image-token stream on ``k`` chosen tokens per sample.

Reads: ``plan.start``, ``plan.end`` and ``plan.layouts`` (each token-carrying node's
layout and the rewrite it needs; with a text subset ``plan.text_layouts`` and
``plan.text_start`` instead), ``ctx.k``, ``ctx.key`` (context mode, ``k_txt``).
Writes:
* new inputs ``specdiff_idx`` (``[B, k]`` int64, image-token indices per sample) and
  ``specdiff_base`` (``[B, N, C]``, the per-token output the non-computed tokens get);
* ``take_tokens`` right after the stream start, all its users moved onto the subset;
* ``scatter_tokens`` right after the stream end: the ``k`` fresh outputs written into
  ``base``, so whatever follows the output projection (unpatchify) sees ``N`` tokens
  again; ``ctx.memo["subset_out"]`` / ``["stream_out"]`` name the ``[B, k, C]`` and
  ``[B, N, C]`` nodes;
* for a stream that carries context tokens too (``plan.stream``, FLUX.2's reference
  images): the stream start is gathered at the image indices *and* every context
  position, and the stream end is rebuilt at full length by
  :func:`~specdiff_fx.ops.restore_stream` (context rows as computed, or zeros when
  context caching dropped them);
* for every full-length token operand without a layout of its own (RoPE tables,
  positional terms): ``take_tokens`` at the same positions (text positions kept whole, or at
  the text index) just before the first op that meets the subset (one gather per operand and
  layout);
* for an attention mask with one row per query: its rows gathered like the queries; for a
  joint attention's mask also its key columns, gathered like the keys (the subset graph's
  attention is then over the subset's own tokens, a valid graph between passes);
  ``ctx.memo["mask_rows"]`` maps the attention to the rows-only mask, which
  :func:`attend_with_kv_cache` puts back once the keys cover every token again;
* constant sizes that spelled the token count (``view``/``reshape``/``expand`` sizes,
  slices and ``split_with_sizes`` sections at segment boundaries) rewritten for ``k``
  (view sizes written out in full, so a ``-1`` never has to be inferred from an empty
  tensor).
With the context cached (``ContextMode.CACHED``) the text segments are dropped as well (length 0 in the
subset graph): token-axis ``cat`` s lose their text operands, full-length text operands
of text-only tensors are gathered to zero tokens, and the text stream's work before the
first attention becomes dead code (the runner removes it); the attention then reads the
text K/V from caches (:func:`attend_with_kv_cache`).
With a text subset (``ContextMode.SUBSET``, ``k_txt`` of the ``M`` text tokens) the text
is a token subset exactly like the image: a new input ``specdiff_idx_txt`` (``Role.TEXT_IDX``,
``[B, k_txt]`` int64 positions in the text order) and one ``take_tokens`` at the text
stream's start (the text input, ``plan.text_start``), all its users moved onto the subset;
the layouts are ``plan.text_layouts`` (traced from both starts, so every text-only tensor
has one); joint tensors hold ``[text subset, image subset]`` in the model's order
(:func:`~specdiff_fx.ops.layout_index` with the text index), their sizes, slices and
sections rewritten for ``k_txt`` text tokens (FLUX's final slice ``[:, M:]`` becomes
``[:, k_txt:]``); the text caches the attention needs are :func:`attend_with_kv_cache`'s.
What only the text output needed (SD3's last block) stays dead code and is removed.
A graph whose stream carries context tokens (FLUX.2 reference images) or whose text does not
reach the attention through per-token ops supports no text subset: ``build_variant`` refuses
the key with ``plan.text_subset_error``.
Keeps true: every per-token op computes, for the kept tokens, exactly what it computed
in the full graph; shapes re-propagate (the runner checks them with fake tensors).
Attention is *not* touched here (see :func:`attend_with_kv_cache`).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops
from ..graph_utils import get_operand, nodes_by_name, set_operand
from ..layout import Layout, _shape_args, node_shape
from ..signature import ContextMode, Port, Role
from .context import RewriteContext


def _text_count(ctx: RewriteContext) -> int | None:
    """Text tokens each text segment holds in the subset graph: ``None`` all (the context
    computed), 0 (cached), ``k_txt`` (a text subset)."""
    return {ContextMode.CACHED: 0, ContextMode.SUBSET: ctx.key.k_txt}.get(ctx.context)


def _index_for(gm: fx.GraphModule, ctx: RewriteContext, layout: Layout, idx: fx.Node) -> fx.Node:
    """The :func:`~specdiff_fx.ops.layout_index` node of ``layout`` (one per layout)."""
    spec = layout.spec()
    if spec not in ctx.memo:
        text = ctx.memo.get("text_idx", _text_count(ctx) is None)  # the text index, or all / none
        after = ctx.memo.get("text_idx", idx)  # the later of the two placeholders
        with gm.graph.inserting_after(after):
            ctx.memo[spec] = gm.graph.call_function(ops.layout_index, (idx, spec, text))
    return ctx.memo[spec]


def _gather_text_start(gm: fx.GraphModule, ctx: RewriteContext, device: torch.device) -> None:
    """A text subset: add ``Role.TEXT_IDX`` and run the text stream on those tokens from its
    start (``plan.text_start``, the text input ``[B, M, C]``) on."""
    plan = ctx.plan
    text_idx = ctx.add_input(gm, Port(Role.TEXT_IDX), (plan.batch, ctx.key.k_txt), torch.int64, device)
    ctx.memo["text_idx"] = text_idx
    start = nodes_by_name(gm)[plan.text_start]
    first = next(n for n in gm.graph.nodes if n in start.users)
    with gm.graph.inserting_before(first):
        sub = gm.graph.call_function(ops.take_tokens, (start, len(node_shape(start)), 1, text_idx))
    start.replace_all_uses_with(sub, delete_user_cb=lambda user: user is not sub)


def _drop_text_operands(node: fx.Node, text_only: tuple[int, ...]) -> None:
    """Context caching: a token-axis ``cat`` loses its operands ``text_only`` (text only)."""
    in_args = bool(node.args)
    tensors = node.args[0] if in_args else node.kwargs["tensors"]
    kept = [t for i, t in enumerate(tensors) if i not in text_only]
    if in_args:
        node.args = (kept, *node.args[1:])
    else:
        node.kwargs = {**node.kwargs, "tensors": kept}


def _rewrite_sizes(node: fx.Node, axis: int, new: int) -> None:
    sizes, where = _shape_args(node)
    static = node_shape(node)
    sizes = [static[j] if s == -1 else s for j, s in enumerate(sizes)]
    sizes[axis] = new
    if where == "kw":
        key = "shape" if "shape" in node.kwargs else "size"
        node.kwargs = {**node.kwargs, key: tuple(sizes)}
    elif where == "tuple":
        node.args = (node.args[0], tuple(sizes), *node.args[2:])
    else:
        node.args = (node.args[0], *sizes)


def gather_token_subset(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    plan, k = ctx.plan, ctx.k
    assert k is not None and 1 <= k <= plan.num_image_tokens
    k_txt = _text_count(ctx)
    subset_text = ctx.context is ContextMode.SUBSET
    layouts = plan.text_layouts if subset_text else plan.layouts
    if subset_text:
        plan.check_text_subset(k_txt)
    nodes = nodes_by_name(gm)
    start = nodes[plan.start]
    device = start.meta.get("val", start.meta.get("example_value")).device
    idx = ctx.add_input(gm, Port(Role.IDX), (plan.batch, k), torch.int64, device)
    ctx.memo["idx"] = idx
    if subset_text:
        _gather_text_start(gm, ctx, device)

    stream = plan.stream  # None: the stream is the image tokens alone
    with gm.graph.inserting_after(start):
        index = idx if stream is None else _index_for(gm, ctx, stream, idx)
        sub = gm.graph.call_function(ops.take_tokens, (start, 3, 1, index))
    start.replace_all_uses_with(sub, delete_user_cb=lambda user: user is not sub)

    end = nodes[plan.end]
    end_val = end.meta.get("val", end.meta.get("example_value"))
    base = ctx.add_input(gm, Port(Role.BASE), (plan.batch, plan.num_image_tokens, plan.out_channels),
                         end_val.dtype, device)
    if stream is None:
        subset = end
        with gm.graph.inserting_after(end):
            restored = whole = gm.graph.call_function(ops.scatter_tokens, (end, idx, base))
    else:  # the image rows scattered into base, the context rows around them as computed
        keep_txt = k_txt is None  # a text subset has no stream with context (check_text_subset)
        offset = stream.to_sub(stream.img_offset(), k, k_txt)
        with gm.graph.inserting_after(end):
            subset = gm.graph.call_function(ops.image_segment, (end, 1, offset, k))
        with gm.graph.inserting_after(subset):
            restored = gm.graph.call_function(ops.scatter_tokens, (subset, idx, base))
        with gm.graph.inserting_after(restored):
            whole = gm.graph.call_function(ops.restore_stream, (end, restored, stream.spec(), keep_txt))
    end.replace_all_uses_with(whole, delete_user_cb=lambda user: user not in (subset, restored, whole))
    ctx.memo["subset_out"], ctx.memo["stream_out"] = subset, restored

    for name, info in layouts.items():
        node = nodes[name]
        for path, layout in info.gathers:
            if k_txt is None and not layout.has_img:
                continue
            operand = get_operand(node, path)
            rank = len(node_shape(node))
            key = ("take", operand, rank, layout.axis, layout.spec())
            if key not in ctx.memo:  # one gather per operand and layout (RoPE tables meet q and k twice)
                index = _index_for(gm, ctx, layout, idx)
                with gm.graph.inserting_before(node):
                    ctx.memo[key] = gm.graph.call_function(ops.take_tokens, (operand, rank, layout.axis, index))
            set_operand(node, path, ctx.memo[key])
        if not info.rewrite:
            continue
        kind = info.rewrite[0]
        if kind == "size":
            _rewrite_sizes(node, info.rewrite[1], info.layout.sub_length(k, k_txt))
        elif kind == "slice":
            _, pos, lo, hi, lay = info.rewrite
            entries = list(node.args[1]) if isinstance(node.args[1], tuple) else [node.args[1]]
            entries[pos] = slice(lay.to_sub(lo, k, k_txt), lay.to_sub(hi, k, k_txt))
            node.args = (node.args[0], tuple(entries) if isinstance(node.args[1], tuple) else entries[0])
        elif kind == "cat":  # with a text subset every text operand is a subset already (analyze_dit)
            if ctx.context is ContextMode.CACHED:
                _drop_text_operands(node, info.rewrite[1])
        elif kind == "mask_keys":  # a joint attention's mask: its key columns follow the subset keys
            _, path, lay = info.rewrite
            rows = get_operand(node, path)
            index = _index_for(gm, ctx, lay, idx)
            with gm.graph.inserting_before(node):
                cols = gm.graph.call_function(ops.take_tokens, (rows, len(node_shape(node)), lay.axis, index))
            set_operand(node, path, cols)
            ctx.memo.setdefault("mask_rows", {})[node.name] = (path, rows)
        elif kind == "sections":
            sizes = [part.sub_length(k, k_txt) for part in info.parts]
            if len(node.args) > 1:
                node.args = (node.args[0], sizes, *node.args[2:])
            else:
                key = "split_sizes" if "split_sizes" in node.kwargs else "split_size_or_sections"
                node.kwargs = {**node.kwargs, key: sizes}
    return gm
