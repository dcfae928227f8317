"""Full variant: return every attention call's image-token keys and values.

Reads: ``plan.attention`` (SDPA node names, their layouts and image offsets),
``plan.parallel``.
Writes: extra outputs ``Role.KV`` ``k{i}`` / ``v{i}`` (``[B, H, N, d]``, the keys and values
exactly as fed to SDPA: after qk-norm and RoPE) in attention order; with
``ContextMode.REFRESH`` also ``Role.TEXT_KV`` ``kt{i}`` / ``vt{i}`` (``[B, H, M, d]``, the text
tokens' keys/values in the model's order, for :func:`attend_with_kv_cache` to read on cached
steps).
Under context parallelism (an attention is :func:`specdiff_fx.ops.ulysses_attention`) the
caches are the keys and values *after* the exchange, as the attention reads them: each
``ulysses_attention`` is replaced by :func:`specdiff_fx.ops.ulysses_attention_kv`, which
returns them with the output (``[B, H/W, W*N, d]``: every rank's image tokens, rank-major,
this rank's heads; text ``[B, H/W, W*M, d]``). The replaced node stays in the graph, unused,
until the dead-code removal after the last pass (later passes find the attention by its name).
The caches are returned in ``config.kv_cache_dtype`` of the keys' dtype (``kv_dtype``: a
rounding node after each segment where it is narrower).
Keeps true: the attention and every user output are unchanged.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .. import ops
from ..graph_utils import nodes_by_name
from ..layout import node_dtype, sdpa_args
from ..signature import ContextMode, Port, Role
from .context import RewriteContext


def _exchanged_kv(gm: fx.GraphModule, sdpa: fx.Node, img_offset: int, n: int, text: bool) -> list[fx.Node]:
    """Replace a ``ulysses_attention`` by ``ulysses_attention_kv``; return the nodes of its
    exchanged image keys and values (and text keys and values with ``text``)."""
    kwargs = {**sdpa.kwargs, "img_offset": img_offset, "n_img": n, "text": text}
    with gm.graph.inserting_after(sdpa):
        both = gm.graph.call_function(ops.ulysses_attention_kv, sdpa.args, kwargs)
    with gm.graph.inserting_after(both):
        parts = [gm.graph.call_function(operator.getitem, (both, j)) for j in range(5 if text else 3)]
    sdpa.replace_all_uses_with(parts[0])
    return parts[1:]


def expose_attention_kv(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    nodes = nodes_by_name(gm)
    n = ctx.plan.num_image_tokens
    for i, site in enumerate(ctx.plan.attention):
        sdpa = nodes[site.node]
        text = ctx.context is ContextMode.REFRESH and site.layout.length > n  # attentions with text
        ports = [Port(Role.KV, i, "k"), Port(Role.KV, i, "v")]
        if text:
            ports += [Port(Role.TEXT_KV, i, "k"), Port(Role.TEXT_KV, i, "v")]
        if sdpa.target is ops.ulysses_attention:
            dtype = node_dtype(sdpa_args(sdpa)["key"])
            kv = _exchanged_kv(gm, sdpa, site.img_offset, n, text)
            ctx.extras.update((port, ctx.cache_kv(gm, node, dtype)) for port, node in zip(ports, kv))
            continue
        args = sdpa_args(sdpa)
        for port in ports:
            fresh = args["key" if port.tensor == "k" else "value"]
            segment = ops.image_segment if port.role is Role.KV else ops.text_segment
            with gm.graph.inserting_before(sdpa):
                node = gm.graph.call_function(segment, (fresh, 2, site.img_offset, n))
            ctx.extras[port] = ctx.cache_kv(gm, node, node_dtype(fresh))
    return gm
