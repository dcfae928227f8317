"""State shared by the rewrite passes of one variant, and the runner that applies them."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..config import SpecDiffConfig
from ..graph_utils import add_placeholder, static_fake_mode
from ..plan import DiTPlan
from ..signature import ContextMode, Port, Role, VariantKey, VariantKind

log = logging.getLogger("specdiff_fx.passes")


@dataclass(frozen=True)
class NewInput:
    """A graph input a pass added: the runtime must pass a tensor of this spec."""

    port: Port
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    in_place: bool = False  # written by this variant beyond the role's own rule (text caches of a text subset)

    @property
    def name(self) -> str:
        return self.port.input_name

    @property
    def updated_in_place(self) -> bool:
        """Whether the variant writes this input (the caller's tensor must be contiguous)."""
        return self.in_place or self.port.updated_in_place


@dataclass
class RewriteContext:
    """What the passes of one variant read and write besides the graph.

    ``key`` says which variant the passes build; ``extras`` are extra outputs (port ->
    node) in the order the variant returns them; ``new_inputs`` are the inputs added after
    the original ones, in placeholder order.
    """

    plan: DiTPlan
    config: SpecDiffConfig
    key: VariantKey
    fake_mode: FakeTensorMode = field(default_factory=static_fake_mode)
    extras: dict[Port, fx.Node] = field(default_factory=dict)
    new_inputs: list[NewInput] = field(default_factory=list)
    memo: dict = field(default_factory=dict)

    @property
    def variant(self) -> str:
        return self.key.kind.value

    @property
    def k(self) -> int | None:
        return self.key.k

    @property
    def context(self) -> ContextMode:
        return self.key.context

    def add_input(self, gm: fx.GraphModule, port: Port, shape, dtype, device, in_place: bool = False) -> fx.Node:
        with self.fake_mode:
            example = torch.empty(tuple(shape), dtype=dtype, device=device)
        node = add_placeholder(gm, port.input_name, example)
        if node.name != port.input_name:
            raise RuntimeError(f"graph input {port.input_name} exists already")
        self.new_inputs.append(NewInput(port, tuple(shape), dtype, torch.device(device), in_place))
        return node

    def cache_kv(self, gm: fx.GraphModule, node: fx.Node, dtype: torch.dtype) -> fx.Node:
        """``node`` (keys or values computed in ``dtype``) as the K/V caches store them:
        rounded to ``config.kv_cache_dtype(dtype)`` by a node right after it, or ``node``
        itself where the dtypes agree."""
        store = self.config.kv_cache_dtype(dtype)
        if store == dtype:
            return node
        with gm.graph.inserting_after(node):
            return gm.graph.call_method("to", (node, store))

    def add_history_inputs(self, gm: fx.GraphModule, like: torch.Tensor) -> tuple[fx.Node, fx.Node]:
        """The inputs :func:`ops.tier_blend` reads, for per-token outputs shaped like ``like``
        (``[B, N, C]``): ``history`` ``[h, B, N, C]`` and ``weights`` ``[B, N, h]``, ``h`` the
        configured history depth."""
        h, plan = self.config.history_depth, self.plan
        history = self.add_input(gm, Port(Role.HISTORY), (h, *like.shape), like.dtype, like.device)
        weights = self.add_input(gm, Port(Role.WEIGHTS), (plan.batch, plan.num_image_tokens, h), like.dtype,
                                 like.device)
        return history, weights


Pass = Callable[[fx.GraphModule, RewriteContext], fx.GraphModule]


def propagate_fake(gm: fx.GraphModule, ctx: RewriteContext) -> None:
    """Re-run shape propagation so every node's ``meta["val"]`` is true for the graph."""
    args = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, torch.Tensor) and not isinstance(val, FakeTensor):
            val = ctx.fake_mode.from_tensor(val)
        elif isinstance(val, FakeTensor) and val.fake_mode is not ctx.fake_mode:
            val = ctx.fake_mode.from_tensor(val)
        args.append(val)
    with ctx.fake_mode:
        FakeTensorProp(gm, ctx.fake_mode).propagate_dont_convert_inputs(*args)


def seed_placeholder_values(gm: fx.GraphModule, example_inputs: Sequence, ctx: RewriteContext) -> None:
    """Give the original placeholders fake values in the context's mode."""
    for node, ex in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if isinstance(ex, torch.Tensor):
            node.meta["val"] = ctx.fake_mode.from_tensor(ex, static_shapes=True)


def _may_mutate(node: fx.Node) -> bool:
    """Conservative impurity for dead-code removal: anything but a plain (non in-place)
    function or method call is kept."""
    if node.op not in ("call_function", "call_method"):
        return node.op != "get_attr"
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name.endswith("_") or node.is_impure()


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass], ctx: RewriteContext) -> fx.GraphModule:
    """Apply ``passes`` in order; after each: lint, recompile, re-propagate shapes, log.
    After the last, remove dead code (e.g. the text stream once context caching drops it;
    not earlier: a pass may add a node that only a later pass wires to the outputs)."""
    for i, p in enumerate(passes):
        gm = p(gm, ctx)
        if i == len(passes) - 1:
            gm.graph.eliminate_dead_code(is_impure_node=_may_mutate)
        gm.graph.lint()
        gm.recompile()
        propagate_fake(gm, ctx)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("after %s (%s variant):\n%s", p.__name__, ctx.variant, gm.print_readable(print_output=False))
    return gm
