"""What happened in a generation, readable after ``pipe(...)``.

``specdiff_fx.last_generation()`` returns the :class:`GenerationReport` of the most recent
generation started by any specdiff-compiled model in this process; ``report.summary()``
prints one line per model call. A server that runs several generations at once reads each
request's report with :func:`track`::

    with specdiff_fx.track() as tracked:
        image = pipe(prompt).images[0]
    log(tracked.report.summary())

``track`` collects the generations that ran a call inside the block *in this thread* (a
thread per request works as is; a loop that interleaves requests step by step enters the
request's tracker around each of its steps: trackers are re-entrant).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepRecord:
    """One call of the transformer (or one internal speculative call).

    ``kind``: ``"speculative"`` (internal pre-run call, not returned to the pipeline),
    ``"full"`` (every token computed; step 0 doubles as the first speculative step),
    ``"cached"`` (``c1`` image tokens computed) or ``"skipped"`` (no token computed). ``c1``/``c2``/``c3`` are per-sample tier sizes (computed / reused /
    blended); ``flops`` is this call's transformer FLOPs (counted once per variant with
    ``torch.utils.flop_counter`` on fake tensors).
    """

    step: int  # main-run step index; -1 for speculative calls
    branch: int  # 0, or 1.. for further calls at the same timestep (e.g. true-CFG)
    kind: str
    sigma: float
    c1: tuple[int, ...]
    c2: tuple[int, ...]
    c3: tuple[int, ...]
    flops: int
    note: str = ""
    #: the error controller's prediction of this call's error of caching (``None``: it made none)
    predicted: float | None = None
    #: the error of caching measured on this call (the relative error of the outputs a sparse
    #: call leaves out: exact on a full call, from the probes on a sparse one; ``None``: not
    #: measured, e.g. the first call or a controller that does not measure)
    measured: float | None = None


@dataclass
class GenerationReport:
    """Telemetry of one generation (one sequence of decreasing timesteps)."""

    family: str
    num_image_tokens: int
    batch: int
    cache_ratio: float
    full_flops: int  # FLOPs of one call of the untouched graph
    steps: list[StepRecord] = field(default_factory=list)
    cache_bytes: int = 0
    compile_seconds: float = 0.0
    compiles: int = 0
    notes: list[str] = field(default_factory=list)
    #: per sample and image token, how many cached steps computed it (branch 0); ``[B, N]`` int32
    #: on the model's device (summed there: reading it per call would synchronise a GPU)
    computed_counts: object = None
    #: whether cached steps read the context tokens' K/V from caches (``None``: no cached step yet)
    context_cached: bool | None = None
    #: ``(k_txt, M)``: context tokens computed per sample on a cached step, of ``M`` (``k_txt``
    #: < ``M``: the others' K/V read from caches); ``None``: no cached step yet, or no context
    context_tokens: tuple[int, int] | None = None
    #: the generation's number (unique in the process, increasing)
    id: int = 0
    #: generations the runtime held after this generation's last call (itself included), and
    #: the bytes of state they held together (caches, traces, speculative records)
    live_generations: int = 0
    held_bytes: int = 0
    #: context parallelism: this rank and the group (``(group name, world size, rank)``); the report
    #: is this rank's (its tokens, its FLOPs): :func:`gather_reports` / :func:`aggregate` give
    #: every rank's and the whole model's
    rank: int = 0
    parallel: tuple[str, int, int] | None = None
    #: ``(index in steps, 0-d tensor)``: measured errors the runtime has not read back yet (on
    #: a GPU reading one right after its call would wait for the call); :meth:`settle` reads them
    unsettled: list = field(default_factory=list, repr=False, compare=False)

    def defer(self, index: int, error: Any) -> None:
        """``steps[index]``'s measured error is ``error``, a 0-d tensor read on :meth:`settle`."""
        self.unsettled.append((index, error))

    def settle(self) -> "GenerationReport":
        """Read back the measured errors still on the device into their step records (the
        runtime does on the generation's next call; :func:`last_generation`, :func:`track`'s
        reports, :attr:`main_steps` and :meth:`summary` do before returning)."""
        pending, self.unsettled = self.unsettled, []
        for i, error in pending:
            self.steps[i] = dataclasses.replace(self.steps[i], measured=float(error))
        return self

    @property
    def main_steps(self) -> list[StepRecord]:
        self.settle()
        return [s for s in self.steps if s.kind != "speculative"]

    def count(self, kind: str) -> int:
        return sum(1 for s in self.steps if s.kind == kind)

    @property
    def flops_fraction(self) -> float:
        """Transformer FLOPs executed (speculative calls included) over the FLOPs of
        computing every main-run call in full."""
        return _flops_fraction([self])

    @property
    def context(self) -> str:
        """What cached steps did with the context tokens: ``"cached"``, ``"computed"`` or
        ``"k of M computed"``."""
        if self.context_tokens is None:
            return "cached" if self.context_cached else "computed"
        k, m = self.context_tokens
        return "cached" if k == 0 else "computed" if k == m else f"{k} of {m} computed"

    def summary(self) -> str:
        self.settle()
        shard = f" (rank {self.rank} of {self.parallel[1]}: its shard)" if self.parallel else ""
        lines = [
            f"specdiff generation {self.id}: {self.family}, {self.num_image_tokens} image tokens{shard}, "
            f"batch {self.batch}, cache_ratio {self.cache_ratio}",
            f"  calls: {self.count('speculative')} speculative, {self.count('full')} full, "
            f"{self.count('cached')} cached" + (f", {self.count('skipped')} skipped" if self.count("skipped") else "")
            + f"; FLOPs executed: {self.flops_fraction:.1%} of full compute; "
            f"cache {self.cache_bytes / 2**20:.1f} MiB; {self.compiles} compiles, {self.compile_seconds:.1f} s; "
            f"context tokens {self.context} on cached steps; "
            f"{self.live_generations} generation(s) in flight holding {self.held_bytes / 2**20:.1f} MiB",
            "  step branch kind         sigma    C1/C2/C3 (sample 0)   FLOPs vs full  measured error",
        ]
        for s in self.steps:
            tiers = f"{s.c1[0]}/{s.c2[0]}/{s.c3[0]}" if s.c1 else "-"
            frac = s.flops / self.full_flops if self.full_flops else float("nan")
            step = "spec" if s.step < 0 else str(s.step)
            measured = f"{s.measured:8.3f}" if s.measured is not None else f"{'-':>8}"
            lines.append(f"  {step:>4} {s.branch:>6} {s.kind:<11} {s.sigma:7.4f}  {tiers:<20} {frac:6.1%} {measured}"
                         + (f"  {s.note}" if s.note else ""))
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def gather_reports(report: GenerationReport) -> list[GenerationReport]:
    """Every rank's report of this generation, in rank order (a collective: call it on every
    rank of the group). Without context parallelism: ``[report]``."""
    report.settle()
    if report.parallel is None:
        return [report]
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    out: list[Any] = [None] * report.parallel[1]
    dist.all_gather_object(out, report, group=_resolve_process_group(report.parallel[0]))
    return out


def aggregate(reports: list[GenerationReport]) -> GenerationReport:
    """The whole model's report from every rank's (:func:`gather_reports`): tokens, FLOPs
    and cache bytes summed over the ranks, the steps of rank 0 (every rank takes the same
    decisions) with their FLOPs summed; notes of any rank. Raises ``ValueError`` if the
    ranks' steps differ."""
    first = reports[0]
    kinds = [(s.step, s.branch, s.kind) for s in first.steps]
    for r in reports[1:]:
        if [(s.step, s.branch, s.kind) for s in r.steps] != kinds:
            raise ValueError(f"rank {r.rank} took other decisions than rank {first.rank}")
    steps = [dataclasses.replace(s, flops=sum(r.steps[i].flops for r in reports)) for i, s in enumerate(first.steps)]
    return dataclasses.replace(
        first, steps=steps, num_image_tokens=sum(r.num_image_tokens for r in reports),
        full_flops=sum(r.full_flops for r in reports), cache_bytes=sum(r.cache_bytes for r in reports),
        held_bytes=sum(r.held_bytes for r in reports), computed_counts=None,
        notes=list(dict.fromkeys(n for r in reports for n in r.notes)), rank=0, parallel=None)


_LAST: list[GenerationReport | None] = [None]
_TRACKERS = threading.local()


def set_last(report: GenerationReport) -> None:
    _LAST[0] = report


def _flops_fraction(reports: list[GenerationReport]) -> float:
    """FLOPs the ``reports``' calls executed (speculative calls included) over those of their
    main-run calls computed in full; NaN where that is zero."""
    full = sum(len(r.main_steps) * r.full_flops for r in reports)
    if not full:
        return float("nan")
    return sum(s.flops for r in reports for s in r.steps) / full


def last_generation() -> GenerationReport | None:
    """The report of the most recent generation started by a specdiff-compiled model."""
    report = _LAST[0]
    return report.settle() if report is not None else None


class Tracker:
    """The reports of the generations that ran calls while the tracker was active in this
    thread, in the order they first did; see :func:`track`."""

    def __init__(self) -> None:
        self._reports: list[GenerationReport] = []

    @property
    def reports(self) -> list[GenerationReport]:
        return [r.settle() for r in self._reports]

    @property
    def flops_fraction(self) -> float:
        """Transformer FLOPs executed by every generation tracked (speculative calls included)
        over the FLOPs of computing each one's main-run calls in full: a request's share where
        it runs several generations (skip-layer guidance's second graph, Wan 2.2's two experts,
        two resolutions). NaN if none ran a call."""
        return _flops_fraction(self.reports)

    @property
    def report(self) -> GenerationReport:
        """The one generation tracked (``ValueError`` if none or several)."""
        if len(self.reports) != 1:
            raise ValueError(f"the tracker saw {len(self.reports)} generations; read .reports")
        return self.reports[0]

    def __enter__(self) -> "Tracker":
        stack = getattr(_TRACKERS, "stack", None)
        if stack is None:
            stack = _TRACKERS.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _TRACKERS.stack.remove(self)


def track() -> Tracker:
    """A context manager collecting the reports of the generations that run calls inside it,
    in this thread (re-entrant: enter the same tracker again for a request's next step)."""
    return Tracker()


def note_call(report: GenerationReport) -> None:
    """Called by the runtime on every call: the active trackers of this thread see ``report``."""
    for tracker in getattr(_TRACKERS, "stack", ()):
        if not any(r is report for r in tracker._reports):
            tracker._reports.append(report)
