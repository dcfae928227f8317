"""Token layouts: where the image tokens sit in each tensor of a DiT graph.

A *layout* says that one axis of a tensor is a token axis made of segments, each either
``img`` (the N image tokens, in the order of the patch grid) or ``txt`` (context tokens:
computed whole, dropped when their K/V are cached, or a subset of them, see
:meth:`Layout.sub_length`). The patch-embedding output has layout ``axis=1, (img N)``; a joint
attention input has e.g. ``axis=2, (img N, txt M)`` (SD3) or ``(txt M, img N)`` (FLUX).

:func:`propagate_layouts` walks a graph forward from the image-token stream's start and
gives every node that carries tokens its layout, using one rule per *kind* of op
(per-token pointwise, trailing-dim ops, views, slices, splits, concatenations,
attention). That is the one general mechanism the sparse rewrite rests on: an op whose
rule holds treats every token independently (or, for attention, only mixes tokens on
the key axis), so running it on a subset of the image tokens gives those tokens' exact
results. An op with no rule, or one whose rule fails (a view that merges the token
axis, a slice that cuts a segment), raises :class:`LayoutError` and the whole graph
falls back to plain Inductor.

Nodes are classified by :func:`op_name`, which maps Dynamo's torch-level targets
(``operator.add``, ``torch._C._nn.linear``, ``"view"`` methods, ...) onto one name.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import ops


class LayoutError(RuntimeError):
    """A node whose effect on the token axis we cannot express: the rewrite must not run."""


@dataclass(frozen=True)
class Seg:
    """A run of tokens along the token axis: ``kind`` is ``"img"`` or ``"txt"``."""

    kind: str
    length: int


@dataclass(frozen=True)
class Layout:
    """The token axis of one tensor and the segments along it (full lengths)."""

    axis: int
    segs: tuple[Seg, ...]

    @property
    def length(self) -> int:
        return sum(s.length for s in self.segs)

    def sub_length(self, k: int, k_txt: int | None = None) -> int:
        """Length of the token axis when the image segment holds ``k`` tokens and the text
        holds ``k_txt``: ``None`` keeps every text segment whole, ``0`` drops them (context
        caching), any other count is a text subset (a layout with one text segment only)."""
        return sum(self._seg_sub(s, k, k_txt) for s in self.segs)

    def _seg_sub(self, seg: Seg, k: int, k_txt: int | None) -> int:
        """The length of segment ``seg`` in the subset graph (see :meth:`sub_length`)."""
        if seg.kind == "img":
            return k
        if k_txt is None:
            return seg.length
        if isinstance(k_txt, bool):  # True/False would read as 1/0 tokens
            raise TypeError("k_txt is a token count or None, not a bool")
        if k_txt and (sum(s.kind == "txt" for s in self.segs) > 1 or k_txt > seg.length):
            raise LayoutError(f"{k_txt} text tokens of {self}: a text subset needs one text segment of >= {k_txt}")
        return k_txt

    def img_offset(self) -> int:
        """Start of the image segment in the full graph (and in the subset graph when the
        text segments are kept whole)."""
        off = 0
        for s in self.segs:
            if s.kind == "img":
                return off
            off += s.length
        raise LayoutError(f"layout {self} has no image segment")

    def boundaries(self) -> list[int]:
        out, off = [0], 0
        for s in self.segs:
            off += s.length
            out.append(off)
        return out

    def to_sub(self, pos: int, k: int, k_txt: int | None = None) -> int:
        """Map a segment boundary of the full axis onto the subset axis (``k_txt`` as in
        :meth:`sub_length`)."""
        full_off, sub_off = 0, 0
        if pos == 0:
            return 0
        for s in self.segs:
            full_off += s.length
            sub_off += self._seg_sub(s, k, k_txt)
            if pos == full_off:
                return sub_off
        raise LayoutError(f"position {pos} is not a segment boundary of {self}")

    def slice(self, start: int, stop: int) -> "Layout":
        """The layout of ``[start:stop]`` along the token axis (boundaries only)."""
        bounds = self.boundaries()
        if start not in bounds or stop not in bounds or start >= stop:
            raise LayoutError(f"slice [{start}:{stop}] cuts a token segment of {self}")
        i, j = bounds.index(start), bounds.index(stop)
        return Layout(self.axis, self.segs[i:j])

    def with_axis(self, axis: int) -> "Layout":
        return Layout(axis, self.segs)

    @property
    def has_img(self) -> bool:
        return any(s.kind == "img" for s in self.segs)

    def spec(self) -> tuple[tuple[str, int], ...]:
        """A hashable, printable form: ``(("txt", 5), ("img", 24))``."""
        return tuple((s.kind, s.length) for s in self.segs)


# ---------------------------------------------------------------------------------
# op classification


_FUNCTION_NAMES: dict[Any, str] = {
    operator.add: "add", operator.sub: "sub", operator.mul: "mul", operator.truediv: "div",
    operator.neg: "neg", operator.pow: "pow", operator.getitem: "getitem",
    operator.iadd: "add", operator.imul: "mul",
    operator.gt: "gt", operator.lt: "lt", operator.ge: "ge", operator.le: "le", operator.eq: "eq", operator.ne: "ne",
    operator.and_: "logical_and", operator.or_: "logical_or", operator.invert: "logical_not",
    torch.where: "where", torch.logical_and: "logical_and", torch.logical_or: "logical_or",
    torch.logical_not: "logical_not",
    torch.add: "add", torch.sub: "sub", torch.mul: "mul", torch.div: "div",
    torch.neg: "neg", torch.pow: "pow", torch.exp: "exp", torch.sin: "sin", torch.cos: "cos",
    torch.tanh: "tanh", torch.sigmoid: "sigmoid", torch.rsqrt: "rsqrt", torch.sqrt: "sqrt",
    torch.abs: "abs", torch.clamp: "clamp", torch.clip: "clamp", torch.square: "square", torch.erf: "erf",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "stack",
    torch.chunk: "chunk", torch.split: "split", torch.unbind: "unbind",
    torch.transpose: "transpose", torch.permute: "permute", torch.movedim: "movedim",
    torch.reshape: "reshape", torch.flatten: "flatten", torch.unflatten: "unflatten",
    torch.unsqueeze: "unsqueeze", torch.squeeze: "squeeze",
    torch.matmul: "matmul", torch.mean: "mean", torch.sum: "sum", torch.softmax: "softmax",
    torch.layer_norm: "layer_norm", torch.rms_norm: "rms_norm",
    torch.nn.functional.linear: "linear", torch._C._nn.linear: "linear",
    F.layer_norm: "layer_norm", F.rms_norm: "rms_norm", F.group_norm: "group_norm",
    F.gelu: "gelu", torch._C._nn.gelu: "gelu", F.silu: "silu", F.relu: "relu",
    F.dropout: "dropout", F.softmax: "softmax", F.mish: "mish",
    F.scaled_dot_product_attention: "sdpa",
    ops.ulysses_attention: "sdpa",  # context parallelism: an attention over every rank's tokens
    torch.view_as_complex: "view_as_complex", torch.view_as_real: "view_as_real",
    torch.empty_like: "empty_like", torch.zeros_like: "zeros_like", torch.ones_like: "ones_like",
    torch.full_like: "full_like", operator.setitem: "setitem",
}

# per-token ops whose every tensor operand broadcasts against the output
POINTWISE = {
    "add", "sub", "mul", "div", "neg", "pow", "exp", "sin", "cos", "tanh", "sigmoid",
    "rsqrt", "sqrt", "abs", "clamp", "square", "erf", "gelu", "silu", "relu", "mish",
    "dropout", "to", "float", "half", "bfloat16", "type", "type_as", "contiguous", "clone",
    "detach", "gt", "lt", "ge", "le", "eq", "ne", "where", "logical_and", "logical_or", "logical_not",
}
# conversions whose tensor operands after the first only give a dtype (and device)
DTYPE_FROM = {"type_as", "to"}
# ops acting on trailing dims only (the token axis must stay out of them)
TRAILING = {"linear", "layer_norm", "rms_norm"}
# complex <-> real views: a trailing dim of size 2 becomes one complex element and back
COMPLEX_VIEWS = {"view_as_complex", "view_as_real"}
# new tensors shaped like their first operand (values independent of it)
LIKE = {"empty_like", "zeros_like", "ones_like", "full_like", "new_empty", "new_zeros", "new_ones", "new_full"}
REDUCE = {"mean", "sum", "softmax", "amax"}
VIEWS = {"view", "reshape", "flatten", "unflatten", "expand"}
SPLITS = {"chunk", "split", "split_with_sizes", "unbind"}


def op_name(node: fx.Node) -> str | None:
    """A canonical name for ``node``'s operation (``None`` for placeholders/outputs)."""
    if node.op == "call_method":
        return {"__getitem__": "getitem", "contiguous": "contiguous", "clip": "clamp"}.get(node.target, node.target)
    if node.op == "call_function":
        name = _FUNCTION_NAMES.get(node.target)
        if name is None and getattr(node.target, "__name__", "") == "scaled_dot_product_attention":
            name = "sdpa"
        return name or f"<{getattr(node.target, '__name__', node.target)}>"
    return None


def node_value(node: fx.Node) -> Any:
    """``node``'s fake value: ``meta["val"]`` (after shape propagation) or Dynamo's
    ``meta["example_value"]``; ``None`` if it has neither."""
    return node.meta.get("val", node.meta.get("example_value"))


def node_shape(node: Any) -> tuple[int, ...] | None:
    """The static shape of ``node``'s value from its fake-tensor metadata, if a tensor."""
    if not isinstance(node, fx.Node):
        return None
    val = node_value(node)
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    return None


def node_dtype(node: fx.Node) -> torch.dtype:
    """The dtype of ``node``'s tensor value from its fake-tensor metadata."""
    return node_value(node).dtype


def sdpa_args(node: fx.Node) -> dict[str, Any]:
    """SDPA's arguments by name, whether Dynamo recorded them positionally or by keyword."""
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _prod(xs: Iterable[int]) -> int:
    return math.prod(xs)


# ---------------------------------------------------------------------------------
# the propagation


@dataclass
class NodeLayout:
    """What propagation learned about one node.

    ``layout`` is the node's own layout (``None`` for tuple-valued nodes, whose parts
    are in ``parts``); ``gathers`` lists operands that are full-length token tensors
    without a layout of their own (e.g. RoPE tables) as ``(arg_path, operand_axis)``;
    ``rewrite`` says how the node's constant arguments change in the subset graph.
    """

    layout: Layout | None = None
    parts: tuple[Layout | None, ...] | None = None
    gathers: tuple[tuple[tuple, Layout], ...] = ()
    rewrite: tuple[Any, ...] = ()


def _tensor_operands(node: fx.Node) -> list[tuple[tuple, fx.Node]]:
    """(path, node) for every Node operand; path indexes args/kwargs (and list items)."""
    out = []
    for i, a in enumerate(node.args):
        if isinstance(a, fx.Node):
            out.append((("args", i), a))
        elif isinstance(a, (list, tuple)):
            out.extend((("args", i, j), x) for j, x in enumerate(a) if isinstance(x, fx.Node))
    for k, a in node.kwargs.items():
        if isinstance(a, fx.Node):
            out.append((("kwargs", k), a))
    return out


def _arg(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _shape_args(node: fx.Node) -> tuple[list[Any], str]:
    """The size list of view/reshape/expand and where it lives (``varargs`` or ``tuple``)."""
    if "shape" in node.kwargs or "size" in node.kwargs:
        return list(node.kwargs.get("shape", node.kwargs.get("size"))), "kw"
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        return list(rest[0]), "tuple"
    return rest, "varargs"


def _view_axis(in_shape: Sequence[int], axis: int, out_shape: Sequence[int]) -> int:
    """The output axis that carries the token axis through a view, or raise."""
    length = in_shape[axis]
    prefix = _prod(in_shape[:axis])
    suffix = _prod(in_shape[axis + 1 :])
    for b, size in enumerate(out_shape):
        if size == length and _prod(out_shape[:b]) == prefix and _prod(out_shape[b + 1 :]) == suffix:
            return b
    raise LayoutError(f"view {tuple(in_shape)} -> {tuple(out_shape)} merges or splits the token axis {axis}")


class _Propagator:
    def __init__(self, graph: fx.Graph, start: fx.Node, end: fx.Node, stream: Layout,
                 text: fx.Node | None = None) -> None:
        self.graph = graph
        self.start = start
        self.end = end
        self.stream = stream
        self.text = text  # the text stream's start [B, M, C] (text-subset layouts), if traced too
        self.info: dict[fx.Node, NodeLayout] = {}

    def lay(self, x: Any) -> Layout | None:
        info = self.info.get(x) if isinstance(x, fx.Node) else None
        return info.layout if info else None

    def run(self) -> dict[fx.Node, NodeLayout]:
        self.info[self.start] = NodeLayout(self.stream)
        if self.text is not None:
            self.info[self.text] = NodeLayout(Layout(1, (Seg("txt", node_shape(self.text)[1]),)))
        started = False
        for node in self.graph.nodes:
            if node is self.start or node is self.text:
                started = True
                continue
            if not started or node.op in ("placeholder", "output", "get_attr"):
                continue
            operands = _tensor_operands(node)
            if op_name(node) in DTYPE_FROM:  # x.type_as(t): t gives a dtype only, no tokens
                operands = operands[:1]
            carriers = [n for _, n in operands if n in self.info]
            if not carriers:
                continue
            if node.op not in ("call_function", "call_method"):
                raise LayoutError(f"node {node.name}: {node.op} on image tokens is not supported")
            self.info[node] = self.rule(node)
            if node is self.end:
                break
        if self.end not in self.info:
            raise LayoutError(f"stream end {self.end.name} is not reached from the stream start")
        return self.info

    # -- the rules ------------------------------------------------------------------
    def rule(self, node: fx.Node) -> NodeLayout:
        name = op_name(node)
        shape = node_shape(node)
        if name == "getitem":
            return self.getitem(node)
        if name in SPLITS:
            return self.split(node, name)
        if name in POINTWISE:
            return self.pointwise(node)
        if name in TRAILING:
            return self.trailing(node, name)
        if name in REDUCE:
            return self.reduce(node, name)
        if name in VIEWS:
            return self.view(node, name)
        if name in COMPLEX_VIEWS:
            return self.complex_view(node, name)
        if name in LIKE:
            return self.like(node, name)
        if name == "setitem":
            return self.setitem(node)
        if name in ("transpose", "permute", "movedim", "unsqueeze", "squeeze"):
            return self.axes(node, name)
        if name == "cat":
            return self.cat(node)
        if name == "stack":
            return self.stack(node)
        if name == "matmul":
            return self.matmul(node)
        if name == "sdpa":
            return self.sdpa(node)
        raise LayoutError(f"node {node.name}: op {name!r} on image tokens has no token rule (shape {shape})")

    def _single(self, node: fx.Node) -> tuple[fx.Node, Layout]:
        src = node.args[0]
        lay = self.lay(src)
        if lay is None:
            raise LayoutError(f"node {node.name}: token operand is not the first argument")
        return src, lay

    def pointwise(self, node: fx.Node) -> NodeLayout:
        out_shape = node_shape(node)
        if out_shape is None:
            raise LayoutError(f"node {node.name}: pointwise op without a tensor value")
        rank = len(out_shape)
        out_layout: Layout | None = None
        operands = _tensor_operands(node)
        if op_name(node) in DTYPE_FROM:  # x.type_as(other), x.to(other): other gives a dtype only
            operands = operands[:1]
        for _, x in operands:
            lay = self.lay(x)
            if lay is None:
                continue
            shp = node_shape(x)
            cand = lay.with_axis(lay.axis + rank - len(shp))
            if out_layout is not None and cand != out_layout:
                raise LayoutError(f"node {node.name}: operands with different token layouts {out_layout} / {cand}")
            out_layout = cand
        assert out_layout is not None
        if out_shape[out_layout.axis] != out_layout.length:
            raise LayoutError(f"node {node.name}: token axis broadcast away")
        gathers = []  # text-only layouts too: with context caching their text is dropped, with a text subset gathered
        for path, x in operands:
            if self.lay(x) is not None:
                continue
            shp = node_shape(x)
            if shp is None:
                continue
            ax = out_layout.axis - (rank - len(shp))
            if ax >= 0 and shp[ax] == out_layout.length and out_layout.length != 1:
                gathers.append((path, out_layout))
        return NodeLayout(out_layout, gathers=tuple(gathers))

    def trailing(self, node: fx.Node, name: str) -> NodeLayout:
        src, lay = self._single(node)
        rank = len(node_shape(src))
        if name == "linear":
            covered = 1
        else:
            ns = _arg(node, 1, "normalized_shape")
            covered = len(ns) if isinstance(ns, (list, tuple)) else 1
        if lay.axis >= rank - covered:
            raise LayoutError(f"node {node.name}: {name} acts on the token axis")
        for _, x in _tensor_operands(node)[1:]:
            if self.lay(x) is not None:
                raise LayoutError(f"node {node.name}: {name} with a token-shaped parameter")
        return NodeLayout(lay)

    def complex_view(self, node: fx.Node, name: str) -> NodeLayout:
        """``view_as_complex`` folds the trailing dim (size 2) into complex elements,
        ``view_as_real`` unfolds it: the token axis keeps its index unless it is that dim."""
        src, lay = self._single(node)
        if name == "view_as_complex" and lay.axis == len(node_shape(src)) - 1:
            raise LayoutError(f"node {node.name}: view_as_complex over the token axis")
        return NodeLayout(lay)

    def like(self, node: fx.Node, name: str) -> NodeLayout:
        """``empty_like(x)`` and kin: a fresh tensor of ``x``'s shape (the ``new_*``
        methods take their size as an argument and so must not be shaped by tokens)."""
        src, lay = self._single(node)
        if name.startswith("new_"):
            raise LayoutError(f"node {node.name}: {name} with a size taken from a token tensor")
        return NodeLayout(lay)

    def setitem(self, node: fx.Node) -> NodeLayout:
        """``x[index] = value`` in place (Dynamo's ``operator.setitem``): exact on a token
        subset when ``x`` carries tokens, the index keeps the token axis whole and ``value``
        is a token tensor that lines up with ``x[index]`` token for token (or has no token
        axis at all, e.g. a scalar). The node has no value."""
        target, index, value = node.args[:3]
        lay = self.lay(target)
        if lay is None:
            raise LayoutError(f"node {node.name}: image tokens written into a tensor that carries none")
        region = self._slice_entries(node, target, lay)
        if region.rewrite:
            raise LayoutError(f"node {node.name}: an in-place write into part of the token axis")
        if isinstance(value, fx.Node):
            vshape, vlay = node_shape(value), self.lay(value)
            entries = index if isinstance(index, tuple) else (index,)
            rank = len(node_shape(target)) - sum(isinstance(e, int) for e in entries) + sum(e is None for e in entries)
            if vlay is not None:
                if vlay.with_axis(vlay.axis + rank - len(vshape)) != region.layout:
                    raise LayoutError(f"node {node.name}: written tokens do not line up with the target's")
            elif vshape is not None and region.layout.axis - (rank - len(vshape)) >= 0 \
                    and vshape[region.layout.axis - (rank - len(vshape))] == region.layout.length != 1:
                raise LayoutError(f"node {node.name}: a full-length value without a token layout written in place")
        return NodeLayout(None)

    def reduce(self, node: fx.Node, name: str) -> NodeLayout:
        src, lay = self._single(node)
        rank = len(node_shape(src))
        dim = _arg(node, 1, "dim")
        if dim is None:
            raise LayoutError(f"node {node.name}: {name} over all dims")
        dims = [_norm_dim(d, rank) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]
        if lay.axis in dims:
            raise LayoutError(f"node {node.name}: {name} over the token axis")
        keep = name == "softmax" or bool(_arg(node, 2, "keepdim", False))
        axis = lay.axis if keep else lay.axis - sum(d < lay.axis for d in dims)
        return NodeLayout(lay.with_axis(axis))

    def view(self, node: fx.Node, name: str) -> NodeLayout:
        src, lay = self._single(node)
        in_shape, out_shape = node_shape(src), node_shape(node)
        if name == "expand":
            axis = lay.axis + len(out_shape) - len(in_shape)
        else:
            axis = _view_axis(in_shape, lay.axis, out_shape)
        rewrite: tuple[Any, ...] = ()
        if name in ("view", "reshape", "expand"):
            sizes, _ = _shape_args(node)
            if any(isinstance(s, fx.Node) for s in sizes):
                raise LayoutError(f"node {node.name}: symbolic sizes are not supported")
            if sizes[axis] not in (lay.length, -1):
                raise LayoutError(f"node {node.name}: unexpected size {sizes[axis]} at the token axis")
            rewrite = ("size", axis)
        return NodeLayout(lay.with_axis(axis), rewrite=rewrite)

    def axes(self, node: fx.Node, name: str) -> NodeLayout:
        src, lay = self._single(node)
        rank_in = len(node_shape(src))
        rank_out = len(node_shape(node))
        a = lay.axis
        if name == "transpose":
            d0, d1 = (_norm_dim(d, rank_in) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
            a = d1 if a == d0 else d0 if a == d1 else a
        elif name == "permute":
            dims = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
            dims = [_norm_dim(d, rank_in) for d in (dims or node.kwargs["dims"])]
            a = dims.index(a)
        elif name == "movedim":
            src_d = _norm_dim(_arg(node, 1, "source"), rank_in)
            dst_d = _norm_dim(_arg(node, 2, "destination"), rank_in)
            order = [d for d in range(rank_in) if d != src_d]
            order.insert(dst_d, src_d)
            a = order.index(a)
        elif name == "unsqueeze":
            d = _norm_dim(_arg(node, 1, "dim"), rank_out)
            a = a + 1 if d <= a else a
        elif name == "squeeze":
            dim = _arg(node, 1, "dim")
            shp = node_shape(src)
            dims = [d for d in range(rank_in) if shp[d] == 1] if dim is None else [
                _norm_dim(d, rank_in) for d in (dim if isinstance(dim, (list, tuple)) else [dim])
            ]
            dims = [d for d in dims if shp[d] == 1]
            if a in dims:
                raise LayoutError(f"node {node.name}: squeezes the token axis")
            a -= sum(d < a for d in dims)
        return NodeLayout(lay.with_axis(a))

    def _slice_entries(self, node: fx.Node, src: fx.Node, lay: Layout) -> NodeLayout:
        idx = node.args[1]
        entries = list(idx) if isinstance(idx, tuple) else [idx]
        rank = len(node_shape(src))
        n_real = sum(1 for e in entries if e is not None and e is not Ellipsis)
        if Ellipsis in entries:
            pos = entries.index(Ellipsis)
            entries = entries[:pos] + [slice(None)] * (rank - n_real) + entries[pos + 1 :]
        in_dim, out_dim = 0, 0
        result: NodeLayout | None = None
        for pos, e in enumerate(entries):
            if e is None:
                out_dim += 1
                continue
            if isinstance(e, (fx.Node, torch.Tensor, list)):
                raise LayoutError(f"node {node.name}: tensor indexing of a token tensor")
            if in_dim == lay.axis:
                if isinstance(e, int):
                    raise LayoutError(f"node {node.name}: integer index into the token axis")
                if not isinstance(e, slice) or e.step not in (None, 1):
                    raise LayoutError(f"node {node.name}: unsupported index {e!r} on the token axis")
                start = 0 if e.start is None else _norm_dim(e.start, lay.length)
                stop = lay.length if e.stop is None else min(_norm_dim(e.stop, lay.length), lay.length)
                sub = lay.slice(start, stop).with_axis(out_dim)
                rewrite = () if (start, stop) == (0, lay.length) else ("slice", pos, start, stop, lay)
                result = NodeLayout(sub, rewrite=rewrite)
            if not isinstance(e, int):
                out_dim += 1
            in_dim += 1
        if result is None:  # the token axis lies past the given entries
            result = NodeLayout(lay.with_axis(out_dim + (lay.axis - in_dim)))
        return result

    def getitem(self, node: fx.Node) -> NodeLayout:
        src = node.args[0]
        info = self.info[src]
        if info.parts is not None:  # an element of a split/chunk/unbind result
            part = info.parts[node.args[1]]
            if part is None:
                raise LayoutError(f"node {node.name}: element without a token layout")
            return NodeLayout(part)
        if info.layout is None:
            raise LayoutError(f"node {node.name}: getitem on an unknown token value")
        return self._slice_entries(node, src, info.layout)

    def split(self, node: fx.Node, name: str) -> NodeLayout:
        src, lay = self._single(node)
        rank = len(node_shape(src))
        if name == "unbind":
            d = _norm_dim(_arg(node, 1, "dim", 0), rank)
            if d == lay.axis:
                raise LayoutError(f"node {node.name}: unbind over the token axis")
            n = node_shape(src)[d]
            return NodeLayout(parts=(lay.with_axis(lay.axis - (d < lay.axis)),) * n)
        d = _norm_dim(_arg(node, 2, "dim", 0), rank)
        size_arg = _arg(node, 1, "split_size_or_sections" if name == "split" else (
            "split_sizes" if name == "split_with_sizes" else "chunks"))
        total = node_shape(src)[d]
        if name == "chunk":
            step = -(-total // size_arg)
            sizes = [min(step, total - i) for i in range(0, total, step)]
        elif isinstance(size_arg, int):
            sizes = [min(size_arg, total - i) for i in range(0, total, size_arg)]
        else:
            sizes = list(size_arg)
        if d != lay.axis:
            return NodeLayout(parts=(lay,) * len(sizes))
        if name == "chunk" or isinstance(size_arg, int):
            raise LayoutError(f"node {node.name}: {name} into equal parts along the token axis")
        parts, off = [], 0
        for s in sizes:
            parts.append(lay.slice(off, off + s))
            off += s
        return NodeLayout(parts=tuple(parts), rewrite=("sections", lay))

    def cat(self, node: fx.Node) -> NodeLayout:
        tensors = _arg(node, 0, "tensors")
        rank = len(node_shape(node))
        d = _norm_dim(_arg(node, 1, "dim", 0), rank)
        lays = [self.lay(t) for t in tensors]
        ref = next(l for l in lays if l is not None)
        if d == ref.axis:
            segs: list[Seg] = []
            for t, l in zip(tensors, lays):
                if l is None:
                    segs.append(Seg("txt", node_shape(t)[d]))
                elif l.axis != d:
                    raise LayoutError(f"node {node.name}: cat of tensors with different token axes")
                else:
                    segs.extend(l.segs)
            if sum(s.kind == "img" for s in segs) != 1:
                raise LayoutError(f"node {node.name}: cat must hold exactly one image segment")
            text_only = tuple(i for i, l in enumerate(lays) if l is None or not l.has_img)
            return NodeLayout(Layout(d, tuple(segs)), rewrite=("cat", text_only) if text_only else ())
        if any(l is None or l != ref for l in lays):
            raise LayoutError(f"node {node.name}: cat along a non-token axis of mixed tensors")
        return NodeLayout(ref)

    def stack(self, node: fx.Node) -> NodeLayout:
        tensors = _arg(node, 0, "tensors")
        rank = len(node_shape(node))
        d = _norm_dim(_arg(node, 1, "dim", 0), rank)
        lays = [self.lay(t) for t in tensors]
        if any(l is None or l != lays[0] for l in lays):
            raise LayoutError(f"node {node.name}: stack of mixed token tensors")
        a = lays[0].axis
        return NodeLayout(lays[0].with_axis(a + 1 if d <= a else a))

    def matmul(self, node: fx.Node) -> NodeLayout:
        a, b = node.args[0], node.args[1]
        la, lb = self.lay(a), self.lay(b)
        if lb is not None or la is None:
            raise LayoutError(f"node {node.name}: matmul mixing token positions")
        rank_a = len(node_shape(a))
        if la.axis == rank_a - 1 or rank_a < 2:
            raise LayoutError(f"node {node.name}: matmul contracts the token axis")
        return NodeLayout(la.with_axis(la.axis + len(node_shape(node)) - rank_a))

    def sdpa(self, node: fx.Node) -> NodeLayout:
        """Attention mixes tokens only along the key axis. Two kinds keep the rewrite exact:

        * attention over image keys: key and value share one layout holding the image
          segment, the query holds it too (joint self-attention: the same layout; the keys
          may also hold context tokens the queries lack, e.g. FLUX.2 Klein's cached
          reference-image K/V spliced in): the subset's queries attend to all keys through
          the K/V caches;
        * *query-only* (cross) attention: the query carries image tokens, key and value
          carry none (text keys, as in Wan's cross-attention): it is per query token, so
          the subset's queries attend to the same keys as before and no cache is needed.

        A mask (``attn_mask``, boolean or additive, broadcast against
        ``[B, H, S_q, S_k]``) must not be computed from image tokens; its query axis is 1
        or the full query length (then its rows are gathered with the queries, listed in
        ``gathers``), its key axis 1 or the full key length (the keys stay whole in the
        subset graph).
        """
        args = sdpa_args(node)
        q, k, v = args["query"], args["key"], args["value"]
        lq, lk, lv = self.lay(q), self.lay(k), self.lay(v)
        if lq is None:
            raise LayoutError(f"node {node.name}: attention whose keys carry image tokens but whose queries do not")
        rank = len(node_shape(q))
        if lq.axis != rank - 2:
            raise LayoutError(f"node {node.name}: attention whose token axis is not the sequence axis")
        if (lk is None) != (lv is None) or (lk is not None and (lv != lk or lk.axis != lq.axis)):
            raise LayoutError(f"node {node.name}: attention with mismatched key and value token layouts")
        if lk is not None and [s for s in lk.segs if s.kind == "img"] != [s for s in lq.segs if s.kind == "img"]:
            raise LayoutError(f"node {node.name}: attention whose queries and keys hold different image tokens")
        if args.get("is_causal") or args.get("dropout_p", 0.0):
            raise LayoutError(f"node {node.name}: causal or dropout attention is not supported")
        gathers, rewrite = [], ()
        mask = args.get("attn_mask")
        if isinstance(mask, fx.Node):
            if self.lay(mask) is not None:
                raise LayoutError(f"node {node.name}: an attention mask computed from image tokens")
            shp = node_shape(mask)
            keys = node_shape(k)[-2]
            if shp is None or len(shp) < 2 or shp[-1] not in (1, keys) or shp[-2] not in (1, lq.length):
                raise LayoutError(f"node {node.name}: attention mask of shape {shp} does not broadcast against "
                                  f"{lq.length} queries x {keys} keys")
            path = next(p for p, x in _tensor_operands(node) if x is mask)
            if shp[-2] == lq.length != 1:  # one row per query: the rows follow the computed queries
                gathers.append((path, lq))
            if lk is not None and shp[-1] == lk.length != 1:
                # its columns follow the keys: in the subset graph they are the subset's until the
                # attention rewrite widens the keys to all tokens again
                rewrite = ("mask_keys", path, lk.with_axis(rank - 1))
        return NodeLayout(lq, gathers=tuple(gathers), rewrite=rewrite)


def propagate_layouts(graph: fx.Graph, start: fx.Node, end: fx.Node, n_img: int,
                      stream: Layout | None = None, text: fx.Node | None = None) -> dict[fx.Node, NodeLayout]:
    """Give every node between ``start`` and ``end`` that carries image tokens its layout.

    ``start`` is the token stream ``[B, L, D]``: ``n_img`` image tokens, or, when
    ``stream`` is given, the segments it lists along axis 1 (image tokens and context
    tokens that travel with them, e.g. FLUX.2's reference-image tokens).

    With ``text`` (the text stream's start ``[B, M, C]``, e.g. the ``encoder_hidden_states``
    input) the text tokens are traced from there too: the text stream before the first joint
    attention gets text-only layouts ``(txt M)`` instead of none, so a text *subset* can flow
    through it like the image subset (``ContextMode.SUBSET``). Without it, text-only tensors
    get a layout only once they come out of an attention with image tokens.

    Reads: node shapes (``meta["val"]`` or Dynamo's ``meta["example_value"]``).
    Raises: :class:`LayoutError` for any op on image tokens without a valid rule.
    """
    if stream is None:
        stream = Layout(1, (Seg("img", n_img),))
    if stream.axis != 1 or sum(s.kind == "img" for s in stream.segs) != 1:
        raise LayoutError(f"stream layout {stream} must hold one image segment along axis 1")
    return _Propagator(graph, start, end, stream, text).run()
