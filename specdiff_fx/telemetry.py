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

import threading
from dataclasses import dataclass, field


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
    #: per sample and image token, how many cached steps computed it (branch 0); ``[B, N]``
    computed_counts: object = None
    #: whether cached steps read the context tokens' K/V from caches (``None``: no cached step yet)
    context_cached: bool | None = None
    #: the generation's number (unique in the process, increasing)
    id: int = 0
    #: generations the runtime held after this generation's last call (itself included), and
    #: the bytes of state they held together (caches, traces, speculative records)
    live_generations: int = 0
    held_bytes: int = 0

    @property
    def main_steps(self) -> list[StepRecord]:
        return [s for s in self.steps if s.kind != "speculative"]

    def count(self, kind: str) -> int:
        return sum(1 for s in self.steps if s.kind == kind)

    @property
    def flops_fraction(self) -> float:
        """Transformer FLOPs executed (speculative calls included) over the FLOPs of
        computing every main-run call in full."""
        main = len(self.main_steps)
        if not main or not self.full_flops:
            return float("nan")
        return sum(s.flops for s in self.steps) / (main * self.full_flops)

    def summary(self) -> str:
        lines = [
            f"specdiff generation {self.id}: {self.family}, {self.num_image_tokens} image tokens, batch {self.batch}, "
            f"cache_ratio {self.cache_ratio}",
            f"  calls: {self.count('speculative')} speculative, {self.count('full')} full, "
            f"{self.count('cached')} cached" + (f", {self.count('skipped')} skipped" if self.count("skipped") else "")
            + f"; FLOPs executed: {self.flops_fraction:.1%} of full compute; "
            f"cache {self.cache_bytes / 2**20:.1f} MiB; {self.compiles} compiles, {self.compile_seconds:.1f} s; "
            f"context tokens {'cached' if self.context_cached else 'computed'} on cached steps; "
            f"{self.live_generations} generation(s) in flight holding {self.held_bytes / 2**20:.1f} MiB",
            "  step branch kind         sigma    C1/C2/C3 (sample 0)   FLOPs vs full",
        ]
        for s in self.steps:
            tiers = f"{s.c1[0]}/{s.c2[0]}/{s.c3[0]}" if s.c1 else "-"
            frac = s.flops / self.full_flops if self.full_flops else float("nan")
            step = "spec" if s.step < 0 else str(s.step)
            lines.append(f"  {step:>4} {s.branch:>6} {s.kind:<11} {s.sigma:7.4f}  {tiers:<20} {frac:6.1%}"
                         + (f"  {s.note}" if s.note else ""))
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


_LAST: list[GenerationReport | None] = [None]
_TRACKERS = threading.local()


def set_last(report: GenerationReport) -> None:
    _LAST[0] = report


def last_generation() -> GenerationReport | None:
    """The report of the most recent generation started by a specdiff-compiled model."""
    return _LAST[0]


class Tracker:
    """The reports of the generations that ran calls while the tracker was active in this
    thread, in the order they first did; see :func:`track`."""

    def __init__(self) -> None:
        self.reports: list[GenerationReport] = []

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
        if not any(r is report for r in tracker.reports):
            tracker.reports.append(report)
