"""Generations in flight together: interleaved call by call, or in threads started together."""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import specdiff_fx


def run_together(setups: Sequence[Callable[[], Callable[[], Any]]], timeout: float = 300.0) -> list[tuple[Any, Any]]:
    """Each ``setup()`` runs in its own thread and returns the generation to run; the
    generations start together (a barrier) and run to their end. Returns ``(result, report)``
    per thread, the report read with :func:`specdiff_fx.track` in that thread; re-raises the
    first error of any thread."""
    n = len(setups)
    out: list[Any] = [None] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def work(j: int) -> None:
        try:
            run = setups[j]()
            barrier.wait()
            with specdiff_fx.track() as tracked:
                result = run()
            out[j] = (result, tracked.report)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(j,)) for j in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    if errors:
        raise errors[0]
    assert all(o is not None for o in out), "a thread did not finish"
    return out


def interleave(gens: Sequence[Any], starts: Sequence[int] | None = None) -> list[Any]:
    """Run the generations call by call: one step each in turn (generation j joins at step
    ``starts[j]`` of the round robin). Each has ``step() -> bool`` (more to do) and ``x``."""
    starts = starts or [0] * len(gens)
    live, pending, r = [], list(range(len(gens))), 0
    while pending or live:
        for j in [j for j in pending if starts[j] <= r]:
            live.append(j)
            pending.remove(j)
        for j in list(live):
            if not gens[j].step():
                live.remove(j)
        r += 1
    return [g.x for g in gens]


def total_flops(reports: Sequence[Any]) -> int:
    """The transformer FLOPs of every call of these generation reports."""
    return sum(s.flops for r in reports for s in r.steps)
