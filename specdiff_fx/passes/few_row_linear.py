"""The sparse variant on a CPU, last before ``finalize_outputs``: linears of a few rows as ``W x^T``.

A cached call computes few tokens, but every block's modulation linear (adaLN: one row per
sample, ``[B, D] x [D, 6D]``) and the embedders' still run whole and read their weights in
full. On a CPU, BLAS computes ``x W^T`` at 2, 4 and 8 rows 4.7, 2.6 and 1.4 times slower than
``W x^T`` (16 weights of 6 MiB, 2 threads; both memory-bound: the weight is streamed once; one
row takes the matrix-vector path either way, as slow, and is computed as two), so on the mid
config the modulation took 8 % of a cached step for a negligible share of its FLOPs
(``BENCHMARKS.md``, "A cached step's modulation linears").

Reads: the linear nodes (``layout.op_name``: ``torch._C._nn.linear`` / ``F.linear``) and the
fake values of their operands and outputs (``meta["val"]``).
Writes: the target of each such node whose input, weight and output are float32 (not under
autocast) on a CPU, whose input has at most :data:`MAX_ROWS` rows (the product of its leading
dims) and whose weight holds at least :data:`MIN_WEIGHT_BYTES`, replaced by
:func:`specdiff_fx.ops.few_row_linear` (same arguments, a missing bias as ``None``).
Keeps true: every node's shape and dtype, the graph's inputs and outputs; values equal up to
float32 rounding (another order of the same products). Nothing on other devices or dtypes
(unmeasured there), nothing with more rows (where ``x W^T`` is as fast or faster).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops  # noqa: F401  (registers specdiff::few_row_linear)
from ..layout import op_name
from .context import RewriteContext

#: at most this many rows: measured faster at 1-8 rows (1 computed as 2), equal at 16
MAX_ROWS = 8
#: at least 1.5 MiB of weight: below that the op's dispatch (about 25 us a call) costs more than
#: the faster product saves (measured, 16 linears at 2 rows, ``F.linear`` against the op, 1 thread:
#: 0.375 MiB 0.36 / 0.78 ms, 1 MiB 1.20 / 1.43, 1.5 MiB 4.70 / 1.89, 6 MiB 15.4 / 6.0; 2 threads:
#: 0.375 MiB 0.38 / 0.62, 1 MiB 1.15 / 0.94, 1.5 MiB 2.64 / 1.23, 6 MiB 15.3 / 3.6): from 1.5 MiB
#: faster at either thread count
MIN_WEIGHT_BYTES = 3 << 19


def rewrites(node: fx.Node) -> bool:
    """Whether :func:`few_row_linear` rewrites ``node``."""
    if node.op != "call_function" or op_name(node) != "linear" or node.kwargs or not 2 <= len(node.args) <= 3:
        return False
    x, weight = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in node.args[:2])
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor) or weight.dim() != 2 or x.dim() < 1:
        return False
    out = node.meta.get("val")
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    # the output's dtype too: under CPU autocast a float32 linear computes in bfloat16
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and isinstance(out, torch.Tensor) and out.dtype == torch.float32
            and weight.numel() * weight.element_size() >= MIN_WEIGHT_BYTES
            and isinstance(rows, int) and 1 <= rows <= MAX_ROWS)  # not a symbolic size


def few_row_linear(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    for node in gm.graph.nodes:
        if rewrites(node):
            args = tuple(node.args) + (None,) * (3 - len(node.args))
            node.target, node.args = torch.ops.specdiff.few_row_linear.default, args
    return gm
