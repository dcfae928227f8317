"""Build one compiled variant (full, sparse or skip) of an analysed DiT graph."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx

from .config import SpecDiffConfig
from .graph_utils import clone_graph_module, is_parameter_input, static_fake_mode
from .passes import NewInput, RewriteContext, passes_for, read_scalars, run_passes
from .passes.context import seed_placeholder_values
from .plan import DiTPlan
from .signature import ContextMode, Port, Role, VariantKey, VariantKind

log = logging.getLogger("specdiff_fx.variants")


#: Inductor settings for the graphs that update caches in place. Inductor writes an
#: ``index_put_`` on a graph input in place (no copy of the cache) only when nothing reads
#: the input's old value after it in graph order; its locality reordering moves the
#: extrapolation that reads the whole cache (``cache + ratio * (cache - prev)``) down to its
#: consumer, past the write, and every cache is then copied, written and copied back on
#: every call (six extra passes over ``N`` rows per cache; ``BENCHMARKS.md``, "the cost of
#: a cached step"). Without that reordering the rows are written in place.
IN_PLACE_CACHES = {"reorder_for_locality": False}

#: Inductor settings for every rewritten variant: no CUDA graphs. A CUDA graph's replay writes
#: its outputs into the memory the replay before it wrote them to, while the runtime keeps a full
#: call's outputs (K/V, token outputs) as caches across calls; the sparse variant writes its
#: caches in place, which Inductor's CUDA graphs skip anyway. A ``mode`` that turns them on
#: ("reduce-overhead", "max-autotune") keeps its other settings for the variants; the untouched
#: graph (``cache_ratio=0``, a fallback) gets the mode as it is.
NO_CUDAGRAPHS = {"triton.cudagraphs": False}


def mode_options(mode: str | None) -> dict[str, Any]:
    """Inductor's settings for ``torch.compile``'s ``mode``; ``ValueError`` for an unknown one."""
    if mode is None or mode == "default":
        return {}
    if not isinstance(mode, str):
        raise ValueError(f"specdiff: mode must be a string (torch.compile's mode), got {type(mode).__name__}")
    from torch._inductor import list_mode_options

    try:
        return dict(list_mode_options(mode))
    except Exception as e:  # Inductor's message lists the modes this torch knows
        raise ValueError(f"specdiff: unknown mode {mode!r}: {e}") from None


def inputs_device(example_inputs: Sequence[Any]) -> torch.device | None:
    """The device of a graph's first tensor input (``None`` without one)."""
    return next((a.device for a in example_inputs if isinstance(a, torch.Tensor)), None)


def asks_for_cudagraphs(mode: str | None) -> bool:
    """Whether ``mode`` (or Inductor's global config) would compile with CUDA graphs."""
    from torch._inductor import config as inductor_config

    return bool(mode_options(mode).get("triton.cudagraphs", inductor_config.triton.cudagraphs))


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], config: SpecDiffConfig,
                  mode: str | None = None, patches: Mapping[str, Any] | None = None,
                  plan: DiTPlan | None = None) -> Callable[..., Any]:
    """Inductor-compile ``gm`` (or return it as a plain FX callable); call as ``fn(*args)``.
    ``patches``: Inductor config settings for this compile, on top of ``mode``'s. With
    a ``plan`` and :meth:`SpecDiffConfig.regional_on` for the inputs' device, block by block
    (:mod:`specdiff_fx.regional`)."""
    if not config.inductor:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    merged = {**mode_options(mode), **(patches or {})}
    device = inputs_device(example_inputs)
    if plan is not None and plan.blocks and config.regional_on(device) and not _reads_numbers(gm):
        from .regional import compile_regions, regional_compile_fx

        with _tracing_context(gm):
            return compile_regions(gm, example_inputs, plan, regional_compile_fx(merged))
    with _tracing_context(gm):
        return compile_fx(gm, list(example_inputs), config_patches=merged or None)


def _reads_numbers(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` reads a Python number from an input (``.item()``: a LoRA scale after
    ``set_adapters``). Block-by-block compiling runs the split graph on the example inputs, which
    inside Dynamo are fake: ``.item()`` of a fake tensor has no value (``DataDependentOutputException``)
    and the graph fell back to plain Inductor. Such a graph compiles whole instead (logged)."""
    if not read_scalars(gm):
        return False
    log.info("specdiff: the graph reads a number from an input (a LoRA scale); compiling it whole, not block by block")
    return True


@contextlib.contextmanager
def _tracing_context(gm: fx.GraphModule) -> Iterator[None]:
    """Inside Dynamo's call of the backend, nothing; a variant compiled later, in the middle of
    a generation, is traced by Inductor in the fake mode the passes propagated its shapes in
    (:func:`~specdiff_fx.graph_utils.static_fake_mode`, found on its placeholders). Without it,
    Inductor's tracing fails on a graph that reads a Python number from an input tensor
    (``.item()``: what Dynamo makes of a float attribute that changed between calls, such as a
    LoRA adapter's scale after ``set_adapters``); with it the number stays a runtime value."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensor

    if TracingContext.try_get() is not None:
        yield
        return
    vals = (n.meta.get("val") for n in gm.graph.find_nodes(op="placeholder"))
    mode = next((v.fake_mode for v in vals if isinstance(v, FakeTensor)), None) or static_fake_mode()
    with tracing(TracingContext(mode)):
        yield


@dataclass
class Variant:
    """A rewritten and compiled graph.

    Call with the original graph inputs followed by the values of ``new_inputs`` (in order;
    :meth:`run` looks them up by port); returns the user outputs followed by the extras
    whose ports ``outputs`` lists.
    """

    key: VariantKey
    gm: fx.GraphModule
    fn: Callable[..., Any]
    new_inputs: tuple[NewInput, ...]
    num_user_outputs: int
    outputs: tuple[Port, ...]
    compile_seconds: float = 0.0
    plan_tokens: int = 0  # N, the image tokens of the graph
    text_tokens: int = 0  # M, the text tokens of the graph (ContextMode.SUBSET)
    flops: int = 0  # per call (count_flops on fake tensors, at build time)
    calls: int = field(default=0)
    _checked: tuple | None = field(default=None, init=False, repr=False, compare=False)
    _loose: tuple[int, ...] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.key.kind.value

    @property
    def k(self) -> int | None:
        return self.key.k

    @property
    def extras(self) -> tuple[str, ...]:
        """The extra outputs' short names (``k0``, ``tokens`` ...), in order."""
        return tuple(p.key for p in self.outputs)

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        """Run the variant on flat arguments. Tensor inputs are made contiguous: the variant
        was compiled for contiguous inputs, whatever strides the caller's tensors have
        (pipelines pass e.g. expanded timesteps; the runtime builds its own inputs); the
        model's parameters that were contiguous on the first call are passed as they are
        (:func:`_loose_inputs`). Caches
        are contiguous already, so their in-place updates land in the caller's tensors.
        Token indices are checked in full (:func:`check_index`)."""
        return self.call(args)

    def call(self, args: Sequence[Any], check_values: bool = True) -> tuple[Any, ...]:
        """:meth:`__call__`; ``check_values=False`` checks the token indices' dtype and shape
        but not their values (range, duplicates), which takes a read of the indices (on a GPU a
        synchronisation): for indices built distinct and in range, as the runtime builds them."""
        self.calls += 1
        n_in = len(args) - len(self.new_inputs)
        if self._checked is None:  # the added inputs with a rule, found once (a call per denoising step)
            self._checked = tuple((j, spec) for j, spec in enumerate(self.new_inputs)
                                  if spec.port.role in (Role.IDX, Role.TEXT_IDX) or spec.updated_in_place)
        for j, spec in self._checked:
            a = args[n_in + j]
            if spec.port.role is Role.IDX:
                check_index(a, spec.shape, self.plan_tokens, check_values)
            elif spec.port.role is Role.TEXT_IDX:
                check_index(a, spec.shape, self.text_tokens, check_values)
            elif not a.is_contiguous():
                raise ValueError(f"specdiff: cache input {spec.name} must be contiguous (it is updated in place)")
        if self._loose is None:
            self._loose = _loose_inputs(self.gm, args)
        args = list(args)
        for i in self._loose:
            if isinstance(args[i], torch.Tensor):
                args[i] = args[i].contiguous()
        return tuple(self.fn(*args))

    def run(self, args: Sequence[Any], values: Mapping[Port, Any],
            check_values: bool = True) -> tuple[tuple[Any, ...], dict[Port, Any]]:
        """Run on the model's inputs ``args`` and the added inputs ``values`` (by port);
        returns (user outputs, {port: extra output}). ``check_values``: as in :meth:`call`."""
        missing = [i.name for i in self.new_inputs if i.port not in values]
        if missing:
            raise KeyError(f"specdiff: no value for the inputs {missing} of the {self.key} variant")
        outputs = self.call([*args, *[values[i.port] for i in self.new_inputs]], check_values)
        n = self.num_user_outputs
        return tuple(outputs[:n]), dict(zip(self.outputs, outputs[n:]))

    def extra_inputs(self, named: Mapping[str, Any]) -> list[Any]:
        """The values of ``new_inputs`` in order, looked up by input name in ``named``."""
        missing = [i.name for i in self.new_inputs if i.name not in named]
        if missing:
            raise KeyError(f"specdiff: no value for the variant inputs {missing}")
        return [named[i.name] for i in self.new_inputs]

    def split(self, outputs: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(user outputs, {extra short name: value})."""
        n = self.num_user_outputs
        return tuple(outputs[:n]), dict(zip(self.extras, outputs[n:]))


def _loose_inputs(gm: fx.GraphModule, args: Sequence[Any]) -> tuple[int, ...]:
    """The positions of ``gm``'s inputs that :meth:`Variant.call` makes contiguous: all but the
    model's parameters that are contiguous on the first call (a parameter keeps its strides from
    call to call as plain ``torch.compile`` assumes; skipping them saves a Python loop over
    hundreds of weights on every denoising step)."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    return tuple(i for i, (p, a) in enumerate(zip(placeholders, args))
                 if not is_parameter_input(p) or not (isinstance(a, torch.Tensor) and a.is_contiguous()))


def build_variant(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    plan: DiTPlan,
    config: SpecDiffConfig,
    key: VariantKey,
    mode: str | None = None,
    passes: Sequence[Callable[..., fx.GraphModule]] | None = None,
) -> Variant:
    """Clone ``gm``, run the passes of the variant ``key`` (``passes``: these instead of
    :func:`~specdiff_fx.passes.passes_for`'s, for benchmarks that compare pass lists), compile.

    Compiles under ``torch.no_grad()``: the variants are inference graphs.
    """
    t0 = time.perf_counter()
    if not isinstance(key, VariantKey):
        raise TypeError(f"build_variant takes a VariantKey, got {key!r}")
    if key.kind is VariantKind.SPARSE and not 1 <= key.k <= plan.num_image_tokens:
        raise ValueError(f"k={key.k} outside [1, {plan.num_image_tokens}]")
    if key.context is ContextMode.SUBSET:
        plan.check_text_subset(key.k_txt)
    clone = clone_graph_module(gm)
    ctx = RewriteContext(plan=plan, config=config, key=key)
    seed_placeholder_values(clone, example_inputs, ctx)
    rewritten = run_passes(clone, passes_for(key, config) if passes is None else tuple(passes), ctx)
    added = [n.name for n in rewritten.graph.find_nodes(op="placeholder")][len(example_inputs):]
    assert added == [i.name for i in ctx.new_inputs], (added, ctx.new_inputs)
    examples = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in example_inputs] + [
        torch.zeros(i.shape, dtype=i.dtype, device=i.device) for i in ctx.new_inputs
    ]
    for j, spec in enumerate(ctx.new_inputs):  # valid, distinct indices for the example call
        if spec.port.role in (Role.IDX, Role.TEXT_IDX):
            count = spec.shape[1]
            index = torch.arange(count, device=spec.device).expand(plan.batch, count)
            examples[len(example_inputs) + j] = index.contiguous()
    flops = count_flops(rewritten, examples)  # before Inductor, which may edit the graph
    with torch.no_grad():
        patches = {**NO_CUDAGRAPHS, **(IN_PLACE_CACHES if key.kind is VariantKind.SPARSE else {})}
        fn = compile_graph(rewritten, examples, config, mode, patches, plan)
    meta = rewritten.meta["specdiff_outputs"]
    return Variant(
        key=key, gm=rewritten, fn=fn, new_inputs=tuple(ctx.new_inputs),
        num_user_outputs=meta["user"], outputs=meta["ports"],
        compile_seconds=time.perf_counter() - t0, plan_tokens=plan.num_image_tokens,
        text_tokens=plan.num_text_tokens, flops=flops,
    )


def check_index(idx: Any, shape: tuple[int, ...], n: int, check_values: bool = True) -> None:
    """``idx`` must be ``[B, k]`` int64 token indices in ``[0, n)`` (image tokens, or text tokens
    for ``Role.TEXT_IDX``), distinct per row
    (a duplicate would scatter two results into one token and lose the other).
    ``check_values=False`` checks dtype and shape only (no read of the values)."""
    if not isinstance(idx, torch.Tensor) or idx.dtype != torch.int64 or tuple(idx.shape) != tuple(shape):
        got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"specdiff: token index must be an int64 tensor of shape {tuple(shape)}, got {got}")
    if not check_values:
        return
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"specdiff: token index out of range [0, {n})")
    if idx.shape[1] > 1 and (idx.sort(dim=1).values.diff(dim=1) == 0).any():
        raise ValueError("specdiff: token index has duplicates within a row")


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """``QK^T`` and ``PV`` of one attention (shapes ``[B, H, S, d]``)."""
    b, h, s_q, d = query
    s_k, d_v = key[-2], value[-1]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


class _TotalOnly:
    """Stands in for ``FlopCounterMode``'s module tracker, which installs *global* module forward
    hooks while it counts: every thread's module calls then run them, and a thread whose call
    Dynamo is tracing meanwhile fails (``... is already tracked for mutation``). The total needs no
    split by module: every count goes to ``"Global"``."""

    parents = ("Global",)

    def __enter__(self) -> "_TotalOnly":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU flash-attention
    kernel (torch has no formula for it), so attention counts the same on every device, and that
    counts the total only (no module hooks: other threads keep calling their models untouched)."""
    from torch.utils.flop_counter import FlopCounterMode

    custom = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flops
    counter = FlopCounterMode(display=False, custom_mapping=custom)
    counter.mod_tracker = _TotalOnly()
    return counter


def count_flops(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> int:
    """FLOPs of one call of ``gm`` (:func:`flop_counter` on fake tensors: no compute)."""
    mode = static_fake_mode()
    fake = [mode.from_tensor(a.detach(), static_shapes=True) if isinstance(a, torch.Tensor) else a
            for a in example_inputs]
    with mode, flop_counter() as counter, torch.no_grad():
        gm(*fake)
    return int(counter.get_total_flops())
