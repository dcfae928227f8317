"""Lockstep across the ranks of a context-parallel model.

Under context parallelism every rank runs its own runtime on its shard of the tokens, and
every compiled variant exchanges tensors with the other ranks (the Ulysses all-to-alls,
the final gather): all ranks must run the same variant, with the same token count, at the
same call, or the collectives mismatch. The inputs of a call (full, before the shard) are
the same on every rank, so routing, sigmas and the speculative run agree by themselves; what
depends on a rank's tokens or options does not:

* whether a call starts a new generation: routing agrees by itself, but ``specdiff_fx.reset()``
  or a weight changed on one rank alone makes that rank start over: every rank then does;
* the memory cap: ``max_cache_bytes`` may differ between ranks (set from each device's free
  memory): every rank applies the smallest (the shards' caches are alike, so the ranks then
  drop the same caches);

* the measured error of caching: each rank sums its squared errors and norms, and the
  ranks all-reduce the sums before dividing, so every rank's controller observes the
  *global* relative error and keeps the same state;
* whether the first call's speculative run happens (a rank without caches skips it);
* the decision itself, as a safety net: the ranks all-reduce (max) ``(action, k)``, full
  winning over sparse over skip, so if one rank must compute every token (its caches
  were dropped, a variant failed to build on it) all do.

:class:`SingleProcess` is the no-op used without context parallelism.
"""

from __future__ import annotations

import torch

from ..control import Action, Decision

_SEVERITY = {Action.SKIP: 0, Action.SPARSE: 1, Action.FULL: 2}


class SingleProcess:
    """No other ranks: decisions and errors are this process's own."""

    rank, world_size = 0, 1

    def agree(self, decision: Decision) -> Decision:
        return decision

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return flag

    def smallest(self, value: int | None) -> int | None:
        """The smallest of every rank's ``value`` (``None``: no bound, larger than any)."""
        return value

    def relative_error(self, squared_error: torch.Tensor | None, squared_norm: torch.Tensor | None,
                       read: bool = True) -> float | torch.Tensor | None:
        """``sqrt(squared_error / squared_norm)`` over every rank's sums; ``None`` (not
        measured) if any rank passes ``None``. A collective: every rank calls it at the same
        point, measured or not. ``read=False`` may return a 0-d tensor instead of a float (not
        read back yet: on a GPU a read waits for every kernel queued before it); a group of
        ranks reads it to agree."""
        if squared_error is None:
            return None
        error = squared_error.sqrt() / squared_norm.sqrt().clamp_min(1e-12)
        return float(error) if read else error


class RankGroup(SingleProcess):
    """The ranks of one context-parallel group (``group_name`` as the compiled graph's
    collectives name it)."""

    def __init__(self, group_name: str, world_size: int) -> None:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _resolve_process_group

        self.group = _resolve_process_group(group_name)
        self.world_size = world_size
        self.rank = dist.get_rank(self.group)
        self._dist = dist

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) \
            if self._dist.get_backend(self.group) == "nccl" else torch.device("cpu")

    def agree(self, decision: Decision) -> Decision:
        mine = torch.tensor([_SEVERITY[decision.action], decision.k or 0], dtype=torch.int64, device=self._device())
        agreed = mine.clone()
        self._dist.all_reduce(agreed, op=self._dist.ReduceOp.MAX, group=self.group)
        if torch.equal(agreed, mine):
            return decision
        action = next(a for a, s in _SEVERITY.items() if s == int(agreed[0]))
        reason = f"another rank decided {action.value}" + (f" (k={int(agreed[1])})" if action is Action.SPARSE else "")
        if action is Action.FULL:
            return Decision.full(reason)
        if action is Action.SPARSE:
            return Decision.sparse(int(agreed[1]), reason)
        return Decision.skip(reason)

    def all(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.int64, device=self._device())
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def smallest(self, value: int | None) -> int | None:
        unbounded = 2 ** 62
        t = torch.tensor([unbounded if value is None else value], dtype=torch.int64, device=self._device())
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MIN, group=self.group)
        return None if int(t.item()) == unbounded else int(t.item())

    def relative_error(self, squared_error: torch.Tensor | None, squared_norm: torch.Tensor | None,
                       read: bool = True) -> float | None:
        sums = torch.zeros(3, dtype=torch.float64, device=self._device())
        if squared_error is not None:
            sums[0], sums[1], sums[2] = squared_error.double(), squared_norm.double(), 1.0
        self._dist.all_reduce(sums, group=self.group)
        if int(sums[2].item()) < self.world_size:
            return None
        return super().relative_error(sums[0], sums[1])


def ranks_for(parallel: tuple[str, int, int] | None) -> SingleProcess:
    return SingleProcess() if parallel is None else RankGroup(*parallel[:2])
