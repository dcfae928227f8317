"""Full variant: return every attention call's image-token keys and values.

Reads: ``plan.attention`` (SDPA node names, their layouts and image offsets).
Writes: extra outputs ``Role.KV`` ``k{i}`` / ``v{i}`` (``[B, H, N, d]``, the keys and values
exactly as fed to SDPA: after qk-norm and RoPE) in attention order; with
``ContextMode.REFRESH`` also ``Role.TEXT_KV`` ``kt{i}`` / ``vt{i}`` (``[B, H, M, d]``, the text
tokens' keys/values in the model's order, for :func:`attend_with_kv_cache` to read on cached
steps).
Keeps true: the attention and every user output are unchanged.
"""

from __future__ import annotations

import torch.fx as fx

from .. import ops
from ..graph_utils import nodes_by_name
from ..layout import sdpa_args
from ..signature import ContextMode, Port, Role
from .context import RewriteContext


def expose_attention_kv(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    nodes = nodes_by_name(gm)
    n = ctx.plan.num_image_tokens
    for i, site in enumerate(ctx.plan.attention):
        sdpa = nodes[site.node]
        args = sdpa_args(sdpa)
        with gm.graph.inserting_before(sdpa):
            for name in ("key", "value"):
                ctx.extras[Port(Role.KV, i, name[0])] = gm.graph.call_function(
                    ops.image_segment, (args[name], 2, site.img_offset, n)
                )
            if ctx.context is ContextMode.REFRESH and site.layout.length > n:  # attentions with text
                for name in ("key", "value"):
                    ctx.extras[Port(Role.TEXT_KV, i, name[0])] = gm.graph.call_function(
                        ops.text_segment, (args[name], 2, site.img_offset, n)
                    )
    return gm
