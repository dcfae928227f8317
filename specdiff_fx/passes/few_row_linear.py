"""The sparse variant on a CPU, last before ``finalize_outputs``: linears of a few rows as ``W x^T``
where this host streams the weight faster that way.

A cached call computes few tokens, but every block's modulation linear (adaLN: one row per
sample, ``[B, D] x [D, 6D]``) and the embedders' still run whole and read their weights in
full. Both operand orders are memory-bound (the weight is streamed once), and which one BLAS
streams faster depends on the host: on an AMD EPYC host ``x W^T`` was 4.7, 2.6 and 1.4 times
slower than ``W x^T`` at 2, 4 and 8 rows (16 weights of 6 MiB, 2 threads), and the rewrite took
7-16 ms off the mid config's cached step; on an Intel Xeon host (MKL, AVX-512) at 2 rows
``W x^T`` was 3.4 times *slower*, and the rewrite added 5-10 ms (``BENCHMARKS.md``, "A cached
step's modulation linears" and "The history blend's OpenMP regions"). So the pass measures: for
each shape it would rewrite, :func:`left_operand_faster` times both forms once per process on
this host (a few tenths of a second at most, at compile time) and the node is rewritten only
where the op is clearly faster.

Reads: the linear nodes (``layout.op_name``: ``torch._C._nn.linear`` / ``F.linear``) and the
fake values of their operands and outputs (``meta["val"]``).
Writes: the target of each such node whose input, weight and output are float32 (not under
autocast) on a CPU, whose input has at most :data:`MAX_ROWS` rows (the product of its leading
dims), whose weight holds at least :data:`MIN_WEIGHT_BYTES` and for whose shape
:func:`left_operand_faster` measured the op faster, replaced by
:func:`specdiff_fx.ops.few_row_linear` (same arguments, a missing bias as ``None``).
Keeps true: every node's shape and dtype, the graph's inputs and outputs; values equal up to
float32 rounding (another order of the same products). Nothing on other devices or dtypes
(unmeasured there), nothing with more rows (on the AMD host ``x W^T`` was as fast from 16 rows;
a cached call's token linears have hundreds).
"""

from __future__ import annotations

import functools
import logging
import math
import statistics
import time

import torch
import torch.nn.functional as F
import torch.fx as fx

from .. import ops  # noqa: F401  (registers specdiff::few_row_linear)
from ..layout import op_name
from .context import RewriteContext

#: The two bounds below are the AMD EPYC host's measurements; they bound which shapes are timed
#: at all, and within them :func:`left_operand_faster` decides on the host at hand.
#: at most this many rows: measured faster at 1-8 rows (1 computed as 2), equal at 16
MAX_ROWS = 8
#: at least 1.5 MiB of weight: below that the op's dispatch (about 25 us a call) costs more than
#: the faster product saves (measured there, 16 linears at 2 rows, ``F.linear`` against the op, 1 thread:
#: 0.375 MiB 0.36 / 0.78 ms, 1 MiB 1.20 / 1.43, 1.5 MiB 4.70 / 1.89, 6 MiB 15.4 / 6.0; 2 threads:
#: 0.375 MiB 0.38 / 0.62, 1 MiB 1.15 / 0.94, 1.5 MiB 2.64 / 1.23, 6 MiB 15.3 / 3.6): from 1.5 MiB
#: faster at either thread count
MIN_WEIGHT_BYTES = 3 << 19
#: the op must take at most this share of ``F.linear``'s time to be used (timing noise on a
#: shared machine is a few per cent; a rewrite that gains less is not worth its risk)
MARGIN = 0.85
#: the weights one timed pass streams add up to at least this, with 2 to 16 weights: more than
#: most CPUs' last-level cache, as a call's distinct weights are (not all: the Intel host of the
#: measurements above has 300 MiB, where both forms stream from that cache alike)
STREAM_BYTES = 48 << 20

log = logging.getLogger("specdiff_fx.passes")


def _time_forms(rows: int, out_features: int, in_features: int) -> tuple[float, float]:
    """Median seconds of one pass over a set of distinct ``[out, in]`` weights, as ``F.linear``
    of ``rows`` rows and as the op; the two forms alternate, after one warm-up pass each."""
    size = out_features * in_features * 4
    n = min(16, max(2, math.ceil(STREAM_BYTES / size)))
    op = torch.ops.specdiff.few_row_linear.default
    times: tuple[list[float], list[float]] = ([], [])
    # real tensors even where the caller traces under a fake mode
    with torch._subclasses.fake_tensor.unset_fake_temporarily(), torch.no_grad():
        g = torch.Generator().manual_seed(0)
        weights = [torch.randn(out_features, in_features, generator=g) for _ in range(n)]
        bias = torch.randn(out_features, generator=g)
        x = torch.randn(rows, in_features, generator=g)
        forms = (lambda w: F.linear(x, w, bias), lambda w: op(x, w, bias))
        for r in range(6):
            for form, out in zip(forms, times):
                t = time.perf_counter()
                for w in weights:
                    form(w)
                if r:
                    out.append(time.perf_counter() - t)
    return statistics.median(times[0]), statistics.median(times[1])


@functools.lru_cache(maxsize=None)
def left_operand_faster(rows: int, out_features: int, in_features: int, threads: int) -> bool:
    """Whether the op (``W x^T``) computes a float32 linear of ``rows`` rows and an
    ``[out_features, in_features]`` weight clearly faster than ``F.linear`` on this host with
    ``threads`` torch threads: measured once per process and shape."""
    linear, op = _time_forms(rows, out_features, in_features)
    faster = op <= MARGIN * linear
    log.info("specdiff: a linear of %d row(s) and a [%d, %d] weight takes %.2f ms as x W^T and %.2f ms as W x^T "
             "on this host (%d threads): %s", rows, out_features, in_features, 1e3 * linear, 1e3 * op, threads,
             "computed as W x^T" if faster else "left to Inductor")
    return faster


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
            and isinstance(rows, int) and 1 <= rows <= MAX_ROWS  # not a symbolic size
            and left_operand_faster(rows, weight.shape[0], weight.shape[1], torch.get_num_threads()))


def few_row_linear(gm: fx.GraphModule, ctx: RewriteContext) -> fx.GraphModule:
    for node in gm.graph.nodes:
        if rewrites(node):
            args = tuple(node.args) + (None,) * (3 - len(node.args))
            node.target, node.args = torch.ops.specdiff.few_row_linear.default, args
    return gm
