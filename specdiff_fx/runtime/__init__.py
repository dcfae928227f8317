"""The runtime around the compiled variants: call routing, per-generation state, the
executor and the step sequencing (:class:`SpecDiffRuntime`)."""

from .core import SpecDiffRuntime, reset_all, same_latent_groups, variants_needed
from .executor import GraphExecutor, SparseInputs, StepOutput
from .state import BranchState, ContextCaching, KVStore, TextKVStore, TokenHistory

__all__ = [
    "BranchState", "ContextCaching", "GraphExecutor", "KVStore", "SparseInputs", "SpecDiffRuntime", "StepOutput",
    "TextKVStore", "TokenHistory", "reset_all", "same_latent_groups", "variants_needed",
]
