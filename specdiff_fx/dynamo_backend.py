"""The ``specdiff`` torch.compile backend.

``torch.compile(model, backend="specdiff", options={...})`` reaches
:func:`specdiff_backend` through the ``torch_dynamo_backends`` entry point (no import of
this package needed); ``backend=specdiff_fx.backend(SpecDiffConfig(...))`` gives the same
through a :class:`SpecDiffBackend` object. For each graph Dynamo hands over, the backend
analyses it (:func:`~specdiff_fx.passes.analyze_dit`) and either wraps the compiled
variants in a :class:`~specdiff_fx.runtime.SpecDiffRuntime`, or — for a graph it does not
recognise, or when a pass fails — compiles the graph untouched with Inductor, records the
reason on a :class:`CompileRecord` and warns once. ``strict=True`` raises instead.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .config import SpecDiffConfig
from .graph_utils import graph_fingerprint
from .passes import DynamicShapes, NotADiT, analyze_dit, collapse_ulysses, read_scalars, specialize_shapes
from .plan import DiTPlan
from .variants import asks_for_cudagraphs, compile_graph, inputs_device, mode_options

log = logging.getLogger("specdiff_fx")

_RECORDS: collections.deque["CompileRecord"] = collections.deque(maxlen=64)
_WARNED: set[str] = set()
#: what each backend configuration compiled for a static graph, by the graph's fingerprint (weak:
#: an entry lives as long as Dynamo keeps the compiled graph). Dynamo routes a shape it has seen
#: through its symbolic-shape graph once it has one, so a specialisation of that graph finds
#: here the runtime of the static graph it equals, with its variants and its live generations.
_BY_SHAPE: "weakref.WeakValueDictionary[tuple, Callable[..., Any]]" = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class CompileRecord:
    """What the backend did with one graph: ``status`` is ``"specdiff"``, ``"plain"``
    (a DiT compiled without caching, e.g. ``cache_ratio=0``) or ``"fallback"``."""

    status: str
    reason: str
    family: str | None
    plan: DiTPlan | None
    seconds: float

    def __str__(self) -> str:
        what = self.plan.summary() if self.plan else "graph not rewritten"
        return f"[{self.status}] {what}" + (f" — {self.reason}" if self.reason else "")


def compile_records() -> list[CompileRecord]:
    """Records of the graphs compiled by any specdiff backend in this process, oldest first."""
    return list(_RECORDS)


def last_record() -> CompileRecord | None:
    return _RECORDS[-1] if _RECORDS else None


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class SpecDiffBackend:
    """A torch.compile backend object: ``torch.compile(m, backend=SpecDiffBackend(cfg))``.

    ``records`` lists what this backend did with each graph it was handed.
    """

    def __init__(self, config: SpecDiffConfig | None = None, mode: str | None = None) -> None:
        self.config = config or SpecDiffConfig()
        inductor_mode = mode_options(mode)  # an unknown mode is refused here, before any graph
        if inductor_mode and not self.config.inductor:
            _warn_once(f"specdiff: mode={mode!r} has no effect with inductor=False (the graphs run as plain FX)")
        self.mode = mode
        self.records: list[CompileRecord] = []
        self.runtimes: list[Any] = []
        #: the runtimes this backend built, by static graph (weak, but :attr:`runtimes` keeps them
        #: alive for the backend's life): Dynamo compiles a frame again when several threads call it
        #: before its first compile is in its cache; each copy would start generations of its own,
        #: and later calls reach only the last
        self._static: "weakref.WeakValueDictionary[tuple, Callable[..., Any]]" = weakref.WeakValueDictionary()
        self._lock = threading.RLock()

    def _record(self, rec: CompileRecord) -> None:
        self.records.append(rec)
        _RECORDS.append(rec)

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable[..., Any]:
        if kwargs:
            raise TypeError(f"unexpected arguments to the specdiff backend: {sorted(kwargs)}")
        return self._compile(gm, example_inputs, dynamic_ok=True)

    def _shape_key(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> tuple | None:
        """What an equal static graph compiled before is found by (:data:`_BY_SHAPE`, ``_static``);
        ``None``: compile anew. Under Inductor's ``freezing`` the weights are compiled in as
        constants, so a graph compiled again (after ``torch._dynamo.reset()``, the remedy for a
        weight change there) must see today's weights: never found."""
        import torch._inductor.config as inductor_config

        if self.config.inductor and inductor_config.freezing:
            return None
        fingerprint = graph_fingerprint(gm, list(example_inputs))
        if fingerprint is None:
            return None
        key = (self.config, self.mode, torch.is_grad_enabled(), fingerprint)
        try:
            hash(key)
        except TypeError:
            return None
        return key

    def _compile(self, gm: fx.GraphModule, example_inputs: Sequence[Any], dynamic_ok: bool) -> Callable[..., Any]:
        """Compile one graph; ``dynamic_ok=False`` for a specialisation of a symbolic-shape
        graph, which first looks for what a configuration equal to this one compiled for an
        equal static graph (a shape Dynamo saw before it made the graph dynamic)."""
        key = self._shape_key(gm, example_inputs)
        with self._lock:
            if not dynamic_ok and key is not None and (seen := _BY_SHAPE.get(key)) is not None:
                log.info("specdiff: a shape compiled before; its compiled graph (and runtime) serve it again")
                return seen
            if dynamic_ok and key is not None and (seen := self._static.get(key)) is not None:
                log.info("specdiff: the same graph compiled again by this backend (threads calling the model before "
                         "its first compile finished); its runtime serves it, with its generations")
                return seen
            fn = self._build(gm, example_inputs, dynamic_ok)
            if key is not None and not isinstance(fn, ShapeSpecializer):
                from .runtime import SpecDiffRuntime

                if not isinstance(fn, (SpecDiffRuntime, _Held)):  # compiled without caching: Dynamo keeps the holder
                    fn = _Held(fn)
                _BY_SHAPE[key] = fn
                if dynamic_ok and isinstance(fn, SpecDiffRuntime):
                    self._static[key] = fn
            return fn

    def _build(self, gm: fx.GraphModule, example_inputs: Sequence[Any], dynamic_ok: bool) -> Callable[..., Any]:
        t0 = time.perf_counter()
        original = gm
        try:
            gm = collapse_ulysses(gm)  # context parallelism: the graph of one rank's tokens
            plan = analyze_dit(gm)
        except DynamicShapes as e:
            if dynamic_ok:
                log.info("specdiff: %s; specialising per input shape", e)
                return ShapeSpecializer(self, original)
            return self._fallback(original, example_inputs, str(e), None, t0)
        except NotADiT as e:
            return self._fallback(original, example_inputs, str(e), None, t0)
        except Exception as e:  # a bug of ours must not cost the user a working model
            return self._fallback(original, example_inputs, f"analysis failed: {type(e).__name__}: {e}", None, t0, e)

        from .control import make_policy
        from .runtime import GraphExecutor, SpecDiffRuntime, variants_needed

        if self.config.cache_ratio == 0.0 or torch.is_grad_enabled():
            reason = "cache_ratio=0: every token computed" if self.config.cache_ratio == 0.0 else (
                "gradients are enabled: specdiff never caches under autograd")
            if torch.is_grad_enabled():
                _warn_once(f"specdiff: {reason}; the graph is compiled without caching")
            fn = compile_graph(original, example_inputs, self.config, self.mode)
            self._record(CompileRecord("plain", reason, plan.family, plan, time.perf_counter() - t0))
            return fn
        if plan.parallel is not None and self.config.score == "attention":
            return self._fallback(original, example_inputs, "score='attention' is not supported under context "
                                  "parallelism (its caches hold every rank's keys for a share of the heads; "
                                  "score='drift', the default, is)", plan, t0)
        device = inputs_device(example_inputs)
        if self.config.inductor and device is not None and device.type == "cuda" and asks_for_cudagraphs(self.mode):
            _warn_once(f"specdiff: mode={self.mode!r} asks for CUDA graphs; the rewritten graphs are compiled "
                       "without them (a CUDA graph's replay overwrites the outputs of the one before, which "
                       "specdiff keeps as caches); the mode's other settings apply")
        try:
            policy = make_policy(self.config, plan.num_image_tokens)
            executor = GraphExecutor(gm, example_inputs, plan, self.config, self.mode,
                                     may_need=variants_needed(self.config, policy, plan))
            runtime = SpecDiffRuntime(plan, self.config, executor, policy)
        except Exception as e:
            return self._fallback(original, example_inputs, f"rewrite failed: {type(e).__name__}: {e}", plan, t0, e)
        self.runtimes.append(runtime)
        self._record(CompileRecord("specdiff", "", plan.family, plan, time.perf_counter() - t0))
        return runtime

    def _fallback(self, gm, example_inputs, reason: str, plan: DiTPlan | None, t0: float,
                  exc: BaseException | None = None) -> Callable[..., Any]:
        if self.config.strict:
            raise NotADiT(f"specdiff (strict=True): {reason}") from exc
        target = "plain Inductor" if self.config.inductor else "the untouched graph (inductor=False)"
        _warn_once(f"specdiff: falling back to {target}: {reason}")
        log.info("specdiff fallback: %s", reason)
        fn = compile_graph(gm, example_inputs, self.config, self.mode)
        self._record(CompileRecord("fallback", reason, plan.family if plan else None, plan,
                                   time.perf_counter() - t0))
        return fn


class _Held:
    """A compiled graph that is not a runtime (compiled without caching, or a fallback), as the
    backend returns it to Dynamo: what Dynamo keeps alive keeps the weak entry of
    :data:`_BY_SHAPE` alive (the callable inside may be one Dynamo replaces, e.g. the bound
    ``forward`` of a lazily recompiled graph module)."""

    __slots__ = ("fn", "__weakref__")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class ShapeSpecializer:
    """What the backend returns for a DiT graph with symbolic shapes (Dynamo makes a
    dimension dynamic once it has seen two sizes, e.g. a second resolution): each new
    concrete input shape gets its own static specialisation and its own runtime, i.e.
    its own compiled variants and its own generation state, as with ``dynamic=False``; a
    specialisation equal to a static graph compiled before gets what was compiled for it
    (see ``SpecDiffBackend._compile``). A number the graph reads from a 0-d tensor input (a
    LoRA scale changed between calls) is baked into the specialisation, so its value is part
    of the key: each new value is another specialisation."""

    def __init__(self, backend: "SpecDiffBackend", gm: fx.GraphModule) -> None:
        self.backend, self.gm = backend, gm
        #: least recently used first; at most :data:`MAX_SPECIALISATIONS`
        self.compiled: collections.OrderedDict[tuple, tuple[Callable[..., Any], list[int]]] = collections.OrderedDict()
        self.scalars = read_scalars(gm)  # inputs whose values a specialisation bakes in
        self._lock = threading.Lock()

    def _key(self, args: Sequence[Any]) -> tuple:
        shapes = tuple((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        return shapes + tuple(args[i].item() for i in self.scalars)  # e.g. a LoRA scale: one graph per value

    def __call__(self, *args: Any) -> Any:
        key = self._key(args)
        with self._lock:  # threads meeting a new shape at once: one specialisation
            if key in self.compiled:
                self.compiled.move_to_end(key)
            else:
                if len(self.compiled) >= MAX_SPECIALISATIONS:
                    self._drop_oldest()
                static, kept = specialize_shapes(self.gm, args)
                inputs = [args[i] for i in kept]
                self.compiled[key] = (self.backend._compile(static, inputs, dynamic_ok=False), kept)
            fn, kept = self.compiled[key]
        return fn(*[args[i] for i in kept])

    def _drop_oldest(self) -> None:
        """Forget the least recently used specialisation: its runtime (compiled variants,
        generations and their caches) is freed unless Dynamo holds it for a static graph too.
        Without the bound every new value of a number the graph reads (a LoRA scale passed per
        call, ``joint_attention_kwargs={"scale": s}``) added a runtime for good."""
        n = len(self.scalars)
        values_vary = n and len({key[:-n] for key in self.compiled}) < len(self.compiled)
        _, (fn, _) = self.compiled.popitem(last=False)
        self.backend.runtimes[:] = [rt for rt in self.backend.runtimes if rt is not fn]
        if values_vary:
            _warn_once(f"specdiff: a number the graph reads (a LoRA scale passed per call) took more than "
                       f"{MAX_SPECIALISATIONS} values with the input shapes on a graph with dynamic shapes, each "
                       "compiled apart; the least recently used are dropped, with their generations. A scale set "
                       "with set_adapters, or torch.compile(..., dynamic=False), avoids it")
        else:
            _warn_once(f"specdiff: more than {MAX_SPECIALISATIONS} input shapes on a graph with dynamic shapes, each "
                       "compiled apart; the least recently used are dropped, with their generations (a shape that "
                       "comes back compiles again)")


#: specialisations one graph with dynamic shapes keeps (:class:`ShapeSpecializer`)
MAX_SPECIALISATIONS = 8


def specdiff_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Any = None,
                     mode: str | None = None) -> Callable[..., Any]:
    """Entry point registered as ``torch_dynamo_backends: specdiff``."""
    config = SpecDiffConfig.from_options(options)
    return SpecDiffBackend(config, mode)(gm, example_inputs)


def backend(config: SpecDiffConfig | dict | None = None, /, mode: str | None = None,
            **options: Any) -> SpecDiffBackend:
    """A backend object for ``torch.compile(m, backend=specdiff_fx.backend(...))``."""
    if isinstance(config, SpecDiffConfig) and not options:
        return SpecDiffBackend(config, mode)
    return SpecDiffBackend(SpecDiffConfig.from_options(config, **options), mode)
