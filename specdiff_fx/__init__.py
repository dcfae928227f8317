"""specdiff_fx: SpecDiff feature caching for diffusion transformers as a torch.compile backend.

Usage::

    pipe.transformer = torch.compile(pipe.transformer, backend="specdiff")

or, with an object::

    import specdiff_fx
    pipe.transformer = torch.compile(pipe.transformer, backend=specdiff_fx.backend(cache_ratio=0.9))
"""

from .dynamo_backend import CompileRecord, SpecDiffBackend, backend, compile_records, last_record, specdiff_backend
from .config import SpecDiffConfig
from .passes import NotADiT, analyze_dit
from .plan import DiTPlan
from .runtime import SpecDiffRuntime, reset_all as reset
from .telemetry import GenerationReport, StepRecord, Tracker, aggregate, gather_reports, last_generation, track
from .variants import Variant, build_variant

__version__ = "0.1.0"

__all__ = [
    "CompileRecord", "DiTPlan", "aggregate", "gather_reports",
    "GenerationReport", "SpecDiffRuntime", "StepRecord", "Tracker", "last_generation",
    "reset", "track", "NotADiT", "SpecDiffBackend", "SpecDiffConfig", "Variant",
    "analyze_dit", "backend", "build_variant", "compile_records", "last_record",
    "specdiff_backend", "__version__",
]
