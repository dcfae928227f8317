"""Both variants: return the attention each image token received, summed over layers.

Reads: ``plan.attention``; the query, key and mask each SDPA node uses *now* (so after
:func:`attend_with_kv_cache` the keys cover all N image tokens even in the subset graph);
``config.score_queries``.
Writes: one extra output ``score`` ``[B, N]`` float32 = sum over attention calls of
:func:`specdiff_fx.ops.received_attention` (head-mean softmax column mass, image
positions only). Cost per attention call: ``S_q'/S_q`` of its ``QK^T`` with
``S_q' = min(S_q, score_queries)`` sampled query rows (all rows when 0); memory: one
``[B, H, S_q', S_k]`` map at a time, never all heads and layers together.
Keeps true: attention outputs and user outputs are unchanged.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from .. import ops
from ..graph_utils import nodes_by_name
from ..layout import sdpa_args
from ..signature import Port, Role
from .context import RewriteContext


def expose_attention_score(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    nodes = nodes_by_name(gm)
    total = None
    for site in ctx.plan.attention:
        sdpa = nodes[site.node]
        args = sdpa_args(sdpa)
        with gm.graph.inserting_after(sdpa):
            score = gm.graph.call_function(
                ops.received_attention,
                (args["query"], args["key"], site.img_offset, ctx.plan.num_image_tokens,
                 ctx.config.score_queries, site.scale),
                {"mask": args["attn_mask"]} if isinstance(args.get("attn_mask"), fx.Node) else {},
            )
        if total is None:
            total = score
        else:
            with gm.graph.inserting_after(score):
                total = gm.graph.call_function(operator.add, (total, score))
    ctx.extras[Port(Role.SCORE)] = total
    return gm
