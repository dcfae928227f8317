"""End-to-end latency of full-size SD3-medium and FLUX.1-dev: eager vs Inductor vs specdiff.

One command (on an H200: SD3 with all three modes 4 minutes, compiles included; FLUX's specdiff
warm-up with whole graphs, before ``regional_compile="auto"`` compiled each distinct block once
on a GPU, took longer than 4 minutes)::

    python benchmarks/gpu_latency.py                       # both models, 28 steps
    python benchmarks/gpu_latency.py --models sd3 --modes eager,specdiff,inductor --timed 1
    python benchmarks/gpu_latency.py --dry-run --no-inductor   # CPU, tiny configs, seconds

Architectures are the published ones with **random bf16 weights** built directly on the GPU
(no checkpoint is loaded), at 1024x1024:

* **SD3-medium** (``SD3Transformer2DModel``: 24 layers, 24 heads x 64, patch 2, 16 latent
  channels): latent 128x128 -> 4096 image tokens, 333 text tokens (77 CLIP + 256 T5),
  classifier-free guidance 7.0 as one batched call of size 2 (uncond first, like
  ``StableDiffusion3Pipeline``), ``timestep = sigma * 1000`` with shift-3 sigmas.
* **FLUX.1-dev** (``FluxTransformer2DModel``: 19 double + 38 single blocks, 24 heads x 128):
  packed latents 4096 tokens x 64, 512 text tokens, batch 1, guidance embedding 3.5,
  ``timestep = sigma`` with FluxPipeline's resolution-dependent shift (mu = 1.15 at 4096
  tokens).

A plain Euler flow-matching loop (``x <- x + (sigma_next - sigma) * v``) calls the
transformer directly. For each model and mode (eager, ``torch.compile(t)``,
``torch.compile(t, backend="specdiff")``) one warm-up generation compiles; the compile time is
the warm-up time minus the best timed generation; then ``--timed`` generations are timed
between ``torch.cuda.synchronize()`` calls. Peak memory (``torch.cuda.max_memory_allocated``,
reset per mode) includes the weights. For specdiff the table adds ``last_generation()``'s
``cache_bytes`` and ``flops_fraction`` and the speedups vs eager and vs Inductor.
``--split`` adds one generation per mode that synchronises around every transformer call and
times it: a second table gives the median milliseconds per call kind (specdiff: full, cached,
skipped), which the end-to-end latency cannot tell apart, and the milliseconds until each call
returned to the host (the device may still run then; the runtime's own reads of device values
wait inside the call). ``--device-time`` adds one more generation per mode under
``torch.profiler`` (each call in a ``record_function`` range, synchronised): the device's busy
milliseconds per call kind (the kernels each call launched) and over the generation. A call
whose synchronised time far exceeds its busy time leaves the device idle: host-bound (launches,
the runtime's Python, Dynamo's guards), where CUDA graphs would help; one close to it is
device-bound.

``--dry-run`` runs exactly the same functions on the CPU with tiny configs (2 layers, hidden
64, 16x16 latents, 4 steps, float32); specdiff then defaults to ``options={"inductor": False}``
(override with ``--specdiff-options``) and ``--no-inductor`` skips the Inductor mode, so CI
finishes in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # running as a script from a checkout without an installed package
    import specdiff_fx
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import specdiff_fx

__all__ = [
    "MODES",
    "SPECS",
    "TINY_SPECS",
    "Inputs",
    "ModeResult",
    "ModelSpec",
    "split_by_kind",
    "benchmark_model",
    "build_transformer",
    "format_table",
    "generate",
    "main",
    "make_inputs",
    "make_sigmas",
    "measure_mode",
]

MODES: tuple[str, ...] = ("eager", "inductor", "specdiff")

# ---------------------------------------------------------------------------------------
# model specs


@dataclass(frozen=True)
class ModelSpec:
    """One architecture at one resolution: constructor config and the inputs of a generation."""

    name: str  # "sd3" or "flux"
    label: str  # shown in the table
    config: dict[str, Any]
    latent_channels: int  # VAE latent channels (16 for both)
    latent_size: int  # latent height = width (1024 px / 8)
    text_tokens: int
    batch: int = 1  # images per generation
    cfg_scale: float | None = None  # SD3: classifier-free guidance, one call of batch 2*batch
    guidance: float | None = None  # FLUX: guidance embedding value

    @property
    def image_tokens(self) -> int:
        """Image tokens per sample (patch 2 for SD3; 2x2 packing for FLUX)."""
        return (self.latent_size // 2) ** 2


SPECS: dict[str, ModelSpec] = {
    "sd3": ModelSpec(
        name="sd3", label="SD3-medium 1024²",
        config={
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24,
            "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "out_channels": 16,
            "pos_embed_max_size": 192,
        },
        latent_channels=16, latent_size=128, text_tokens=333, batch=1, cfg_scale=7.0,
    ),
    "flux": ModelSpec(
        name="flux", label="FLUX.1-dev 1024²",
        config={
            "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
        },
        latent_channels=16, latent_size=128, text_tokens=512, batch=1, guidance=3.5,
    ),
}
"""Full-size specs (what the real run measures)."""

TINY_SPECS: dict[str, ModelSpec] = {
    "sd3": replace(
        SPECS["sd3"], label="SD3 tiny (dry run)",
        config={
            "sample_size": 16, "patch_size": 2, "in_channels": 16, "num_layers": 2,
            "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
            "caption_projection_dim": 64, "pooled_projection_dim": 32, "out_channels": 16,
            "pos_embed_max_size": 16,
        },
        latent_size=16, text_tokens=12,
    ),
    "flux": replace(
        SPECS["flux"], label="FLUX tiny (dry run)",
        config={
            "patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1,
            "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
            "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (8, 12, 12),
        },
        latent_size=16, text_tokens=12,
    ),
}
"""``--dry-run`` specs: 2 layers (FLUX: 1 double + 1 single), hidden 64, 16x16 latents."""

# ---------------------------------------------------------------------------------------
# building the model and the inputs


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_transformer(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The diffusers transformer of ``spec`` with random weights, created directly on ``device``.

    Parameters are allocated and initialised (diffusers' default init) on ``device`` in
    ``dtype`` — no float32 copy on the host, no checkpoint. Eval mode, no gradients.
    """
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if spec.name == "sd3" else FluxTransformer2DModel
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = cls(**spec.config)
    # buffers built explicitly in float32 (SD3's positional table) follow the weights;
    # nn.Module.to: ModelMixin.to only adds a "modules to keep in float32: []" warning here
    nn.Module.to(model, device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


@dataclass
class Inputs:
    """Everything but the latents and timestep that a transformer call needs, plus the noise."""

    noise: torch.Tensor  # SD3: [B, C, H, W]; FLUX: packed [B, tokens, 4C]
    encoder_hidden_states: torch.Tensor
    pooled_projections: torch.Tensor
    img_ids: torch.Tensor | None = None
    txt_ids: torch.Tensor | None = None
    guidance: torch.Tensor | None = None


def make_inputs(spec: ModelSpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    """Random text embeddings (uncond + cond for SD3's CFG), initial noise and FLUX ids."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cfg = spec.config
    calls = 2 * spec.batch if spec.cfg_scale is not None else spec.batch

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    text = randn(calls, spec.text_tokens, cfg["joint_attention_dim"])
    pooled = randn(calls, cfg["pooled_projection_dim"])
    if spec.name == "sd3":
        noise = torch.randn(spec.batch, spec.latent_channels, spec.latent_size, spec.latent_size, generator=gen)
        return Inputs(noise.to(device), text, pooled)
    side = spec.latent_size // 2
    noise = torch.randn(spec.batch, side * side, 4 * spec.latent_channels, generator=gen)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return Inputs(
        noise=noise.to(device), encoder_hidden_states=text, pooled_projections=pooled,
        img_ids=img_ids.reshape(-1, 3).to(device=device, dtype=dtype),
        txt_ids=torch.zeros(spec.text_tokens, 3, device=device, dtype=dtype),
        guidance=torch.full((spec.batch,), float(spec.guidance or 1.0), device=device, dtype=torch.float32),
    )


def make_sigmas(spec: ModelSpec, steps: int) -> torch.Tensor:
    """``steps + 1`` decreasing sigmas ending at 0, as the pipelines' schedulers compute them.

    SD3: ``FlowMatchEulerDiscreteScheduler(shift=3)``: ``linspace(1, shift(1/1000))`` shifted
    by ``shift(s) = 3s / (1 + 2s)``. FLUX: ``linspace(1, 1/steps)`` with FluxPipeline's dynamic
    shift ``e^mu / (e^mu + 1/s - 1)``, ``mu`` linear in the image token count (0.5 at 256, 1.15
    at 4096). Both match diffusers' scheduler to float32 rounding.
    """
    if spec.name == "sd3":
        def shift(x: torch.Tensor | float) -> torch.Tensor | float:
            return 3.0 * x / (1.0 + 2.0 * x)

        s = shift(torch.linspace(1.0, shift(1.0 / 1000), steps, dtype=torch.float64))
    else:
        s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
        mu = 0.5 + (1.15 - 0.5) * (spec.image_tokens - 256) / (4096 - 256)
        s = math.exp(mu) / (math.exp(mu) + (1.0 / s - 1.0))
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


# ---------------------------------------------------------------------------------------
# sampling


def generate(spec: ModelSpec, transformer: Callable[..., Any], inputs: Inputs, sigmas: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """A plain Euler flow-matching loop over ``sigmas``; returns the final latents (float32).

    SD3 concatenates the latents for one CFG call of batch ``2B`` (uncond first) with
    ``timestep = sigma * 1000``; FLUX makes one call with ``timestep = sigma`` and the
    guidance embedding. Timesteps stay float32 (the models cast them internally): in bf16,
    adjacent timesteps near 1000 would round to the same value.
    """
    x = inputs.noise.float()
    device = x.device
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if spec.name == "sd3":
            x_in = torch.cat([x, x]).to(dtype)
            t = torch.full((x_in.shape[0],), sigma * 1000.0, device=device, dtype=torch.float32)
            v = transformer(hidden_states=x_in, encoder_hidden_states=inputs.encoder_hidden_states,
                            pooled_projections=inputs.pooled_projections, timestep=t, return_dict=False)[0]
            v_uncond, v_cond = v.float().chunk(2)
            v = v_uncond + float(spec.cfg_scale) * (v_cond - v_uncond)
        else:
            t = torch.full((x.shape[0],), sigma, device=device, dtype=torch.float32)
            v = transformer(hidden_states=x.to(dtype), encoder_hidden_states=inputs.encoder_hidden_states,
                            pooled_projections=inputs.pooled_projections, timestep=t, img_ids=inputs.img_ids,
                            txt_ids=inputs.txt_ids, guidance=inputs.guidance, return_dict=False)[0].float()
        x = x + (sigma_next - sigma) * v
    return x


# ---------------------------------------------------------------------------------------
# measuring


@dataclass
class ModeResult:
    """One model in one mode."""

    model: str
    mode: str
    warmup_s: float
    latencies_s: list[float]
    peak_bytes: int | None  # None on the CPU
    cache_bytes: int | None = None  # specdiff only
    flops_fraction: float | None = None  # specdiff only
    specdiff_compile_s: float | None = None  # specdiff's own variant compile seconds
    finite: bool = True
    notes: list[str] = field(default_factory=list)
    call_ms: dict[str, list[float]] = field(default_factory=dict)  # --split: ms per call, by call kind
    host_ms: dict[str, list[float]] = field(default_factory=dict)  # --split: ms until each call returned
    #: --device-time: the device's busy ms per call, by call kind, and over the whole generation
    busy_ms: dict[str, list[float]] = field(default_factory=dict)
    busy_total_ms: float | None = None

    @property
    def latency_s(self) -> float:
        """Best timed generation (least disturbed by anything else running)."""
        return min(self.latencies_s)

    @property
    def compile_s(self) -> float:
        """Warm-up generation minus a steady-state one: Dynamo + backend compile time."""
        return max(0.0, self.warmup_s - self.latency_s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _compiled(transformer: nn.Module, mode: str, specdiff_options: dict[str, Any]) -> Callable[..., Any]:
    if mode == "eager":
        return transformer
    torch._dynamo.reset()  # a fresh Dynamo cache per backend
    if mode == "inductor":
        return torch.compile(transformer)
    if mode == "specdiff":
        return torch.compile(transformer, backend="specdiff", options=dict(specdiff_options))
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


class _TimedCalls:
    """Calls ``fn`` with a device synchronisation before and after each call; keeps each
    call's seconds. Only for the ``--split`` generation: the synchronisations remove the
    overlap of host and device work that the timed generations keep."""

    def __init__(self, fn: Callable[..., Any], device: torch.device, annotate: bool = False) -> None:
        self.fn, self.device, self.annotate = fn, device, annotate
        self.seconds: list[float] = []
        self.host: list[float] = []  # until the call returned (the device may still run)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _sync(self.device)
        t0 = time.perf_counter()
        if self.annotate:  # a profiler range per call: the kernels it launched are its children
            with torch.profiler.record_function(f"{CALL_RANGE}{len(self.seconds)}"):
                out = self.fn(*args, **kwargs)
        else:
            out = self.fn(*args, **kwargs)
        self.host.append(time.perf_counter() - t0)
        _sync(self.device)
        self.seconds.append(time.perf_counter() - t0)
        return out


#: the name prefix of each call's profiler range (``--device-time``)
CALL_RANGE = "specdiff_bench_call_"


def busy_per_call(events: Sequence[Any], calls: int) -> tuple[list[float], float]:
    """The device's busy seconds per call (each call's ``record_function`` range: the device time
    of the kernels launched inside it) and over all ``events`` (every kernel's own device time),
    from a profiler's ``events()``."""
    per = [0.0] * calls
    total = 0.0
    for e in events:
        if e.name.startswith(CALL_RANGE):
            i = int(e.name[len(CALL_RANGE):])
            if i < calls:
                per[i] += e.device_time_total / 1e6
        elif getattr(e, "device_type", None) is not None and e.device_type.name != "CPU":
            total += e.self_device_time_total / 1e6
    return per, total


def split_by_kind(seconds: Sequence[float], mode: str, report: Any) -> dict[str, list[float]]:
    """Per-call milliseconds grouped by call kind: specdiff's kinds from the report's main-run
    records (``full``, ``cached``, ``skipped``), every call of another mode under ``mode``.
    Raises ``ValueError`` when the report's calls and the timed calls disagree in number."""
    ms = [1e3 * s for s in seconds]
    if mode != "specdiff":
        return {mode: ms}
    steps = report.main_steps if report is not None else []
    if len(steps) != len(ms):
        raise ValueError(f"{len(ms)} timed calls but {len(steps)} main-run records in the report")
    out: dict[str, list[float]] = {}
    for rec, value in zip(steps, ms):
        out.setdefault(rec.kind, []).append(value)
    return out


def measure_mode(spec: ModelSpec, transformer: nn.Module, mode: str, inputs: Inputs, sigmas: torch.Tensor,
                 dtype: torch.dtype, *, timed: int, specdiff_options: dict[str, Any],
                 log: Callable[[str], None] = print, split: bool = False, device_time: bool = False) -> ModeResult:
    """Warm up (compiles) and time ``timed`` generations of ``spec`` in ``mode``; with
    ``split``, one more generation times each transformer call (synchronised) by call kind;
    with ``device_time`` one more under the profiler measures the device's busy time per call."""
    device = inputs.noise.device
    report_before = specdiff_fx.last_generation()
    fn = _compiled(transformer, mode, specdiff_options)

    def one_generation() -> tuple[torch.Tensor, float]:
        if mode == "specdiff":
            specdiff_fx.reset()  # each generation starts from scratch (it would detect it anyway)
        _sync(device)
        t0 = time.perf_counter()
        out = generate(spec, fn, inputs, sigmas, dtype)
        _sync(device)
        return out, time.perf_counter() - t0

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        out, warmup = one_generation()
        log(f"  {spec.name} {mode}: warm-up generation {warmup:.2f} s")
        latencies = []
        for _ in range(max(1, timed)):
            out, seconds = one_generation()
            latencies.append(seconds)
            log(f"  {spec.name} {mode}: generation {seconds:.3f} s")
    result = ModeResult(
        model=spec.label, mode=mode, warmup_s=warmup, latencies_s=latencies,
        peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        finite=bool(torch.isfinite(out).all()),
    )
    if split:
        timer = _TimedCalls(fn, device)
        with torch.no_grad():
            if mode == "specdiff":
                specdiff_fx.reset()
            generate(spec, timer, inputs, sigmas, dtype)
        result.call_ms = split_by_kind(timer.seconds, mode, specdiff_fx.last_generation())
        result.host_ms = split_by_kind(timer.host, mode, specdiff_fx.last_generation())
        log(f"  {spec.name} {mode}: per call (synchronised) " + ", ".join(
            f"{k} {len(v)} x {sorted(v)[len(v) // 2]:.1f} ms" for k, v in result.call_ms.items()))
    if device_time:
        from torch.profiler import ProfilerActivity, profile

        timer = _TimedCalls(fn, device, annotate=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.no_grad(), profile(activities=activities) as prof:
            if mode == "specdiff":
                specdiff_fx.reset()
            generate(spec, timer, inputs, sigmas, dtype)
        per, total = busy_per_call(prof.events(), len(timer.seconds))
        result.busy_ms = split_by_kind(per, mode, specdiff_fx.last_generation())
        result.busy_total_ms = 1e3 * total
        log(f"  {spec.name} {mode}: device busy per call " + ", ".join(
            f"{k} {len(v)} x {sorted(v)[len(v) // 2]:.1f} ms" for k, v in result.busy_ms.items())
            + f"; {1e3 * total:.1f} ms over the generation, whose calls took {1e3 * sum(timer.seconds):.1f} ms")
    if mode == "specdiff":
        report = specdiff_fx.last_generation()
        if report is None or report is report_before or report.num_image_tokens != spec.image_tokens:
            records = specdiff_fx.compile_records()
            result.notes.append("specdiff ran no cached generation (fallback?): "
                                + ("; ".join(str(r) for r in records[-2:]) or "no compile record"))
        else:
            result.cache_bytes = report.cache_bytes
            result.flops_fraction = report.flops_fraction
            result.specdiff_compile_s = report.compile_seconds
    del fn
    if mode != "eager":
        torch._dynamo.reset()
    return result


def benchmark_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype, *, steps: int, timed: int,
                    modes: Sequence[str], specdiff_options: dict[str, Any], seed: int = 0,
                    log: Callable[[str], None] = print,
                    on_result: Callable[[ModeResult], None] | None = None, split: bool = False,
                    device_time: bool = False) -> list[ModeResult]:
    """Build ``spec``'s transformer and inputs once and measure every mode of ``modes``, in that order.

    ``on_result`` is called after each mode (the script writes its table then, so a run stopped
    by a time limit keeps every mode it finished).
    """
    t0 = time.perf_counter()
    transformer = build_transformer(spec, device, dtype, seed)
    params = sum(p.numel() for p in transformer.parameters())
    log(f"{spec.label}: {params / 1e9:.2f} B parameters built on {device} in {time.perf_counter() - t0:.1f} s; "
        f"{spec.image_tokens} image + {spec.text_tokens} text tokens, {steps} steps")
    inputs = make_inputs(spec, device, dtype, seed)
    sigmas = make_sigmas(spec, steps)
    results = []
    for mode in modes:
        results.append(measure_mode(spec, transformer, mode, inputs, sigmas, dtype, timed=timed,
                                    specdiff_options=specdiff_options, log=log, split=split,
                                    device_time=device_time))
        if on_result is not None:
            on_result(results[-1])
    del transformer, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# ---------------------------------------------------------------------------------------
# reporting


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _median(values: Sequence[float], fmt: str) -> str:
    return _cell(sorted(values)[len(values) // 2] if values else None, fmt)


def format_table(results: Sequence[ModeResult]) -> str:
    """One markdown table: a row per (model, mode); speedups on the specdiff rows."""
    lines = [
        "| model | mode | compile s | latency s/gen | peak mem GiB | specdiff cache MiB | FLOPs vs full "
        "| speedup vs eager | speedup vs Inductor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_model: dict[str, dict[str, ModeResult]] = {}
    for r in results:
        by_model.setdefault(r.model, {})[r.mode] = r
    for r in results:
        rows = by_model[r.model]
        vs_eager = vs_inductor = None
        if r.mode != "eager" and "eager" in rows:
            vs_eager = rows["eager"].latency_s / r.latency_s
        if r.mode == "specdiff" and "inductor" in rows:
            vs_inductor = rows["inductor"].latency_s / r.latency_s
        compile_s = f"{r.compile_s:.1f}" if r.mode != "eager" else "-"
        if r.specdiff_compile_s is not None:
            compile_s += f" (variants {r.specdiff_compile_s:.1f})"
        latency = f"{r.latency_s:.3f}" + ("" if r.finite else " (non-finite output)")
        lines.append(
            f"| {r.model} | {r.mode} | {compile_s} | {latency} | "
            f"{_cell(None if r.peak_bytes is None else r.peak_bytes / 2**30, '.1f')} | "
            f"{_cell(None if r.cache_bytes is None else r.cache_bytes / 2**20, '.1f')} | "
            f"{_cell(r.flops_fraction, '.1%')} | {_cell(vs_eager, '.2f')}{'×' if vs_eager else ''} | "
            f"{_cell(vs_inductor, '.2f')}{'×' if vs_inductor else ''} |")
    notes = [f"* {r.model} {r.mode}: {n}" for r in results for n in r.notes]
    split = [r for r in results if r.call_ms or r.busy_ms]
    if split:
        lines += ["", "| model | mode | call kind | calls | median ms/call (synchronised) | total ms | "
                      "median ms until returned | median device-busy ms/call |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in split:
            for kind in dict.fromkeys([*r.call_ms, *r.busy_ms]):
                ms, host, busy = r.call_ms.get(kind, []), r.host_ms.get(kind, []), r.busy_ms.get(kind, [])
                lines.append(f"| {r.model} | {r.mode} | {kind} | {len(ms or busy)} | {_median(ms, '.2f')} "
                             f"| {_cell(sum(ms) if ms else None, '.1f')} | {_median(host, '.2f')} "
                             f"| {_median(busy, '.2f')} |")
        totals = [r for r in split if r.busy_total_ms is not None]
        lines += [f"* {r.model} {r.mode}: the device busy {r.busy_total_ms:.1f} ms over the profiled generation"
                  for r in totals]
    return "\n".join(lines + ([""] + notes if notes else []))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="sd3,flux", help="comma-separated: sd3, flux")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 28; 4 with --dry-run)")
    parser.add_argument("--timed", type=int, default=None,
                        help="timed generations per mode after the warm-up (default 2; 1 with --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny configs, float32, 4 steps, 1 timed generation: checks the script in seconds")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated modes, measured in this order (default eager,inductor,specdiff)")
    parser.add_argument("--no-inductor", action="store_true", help="skip the plain Inductor mode")
    parser.add_argument("--split", action="store_true",
                        help="one more generation per mode that times each call (synchronised), by call kind")
    parser.add_argument("--device-time", action="store_true",
                        help="one more generation per mode under torch.profiler: the device's busy time per call kind")
    parser.add_argument("--specdiff-options", default=None,
                        help='JSON dict for torch.compile(..., backend="specdiff", options=...); '
                             'the dry run defaults to {"inductor": false}')
    parser.add_argument("--inductor-config", default=None,
                        help='JSON dict of torch._inductor.config settings for every compiled mode (Inductor and '
                             'specdiff alike), e.g. \'{"cpp_wrapper": true}\'')
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="weights/activations dtype (default bfloat16; float32 with --dry-run)")
    parser.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="gpu_latency.md", help="markdown file the table is written to")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    # each variant's compile time, as the runtime logs it ("compiled the ... variant in N s")
    logging.basicConfig(format="  %(message)s")
    logging.getLogger("specdiff_fx.runtime").setLevel(logging.INFO)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in SPECS]
    if unknown or not names:
        raise SystemExit(f"--models: unknown {unknown}; choose from {sorted(SPECS)}")
    specs = TINY_SPECS if args.dry_run else SPECS
    steps = args.steps if args.steps is not None else (4 if args.dry_run else 28)
    timed = args.timed if args.timed is not None else (1 if args.dry_run else 2)
    dtype = getattr(torch, args.dtype or ("float32" if args.dry_run else "bfloat16"))
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run")
    options: dict[str, Any] = {"inductor": False} if args.dry_run else {}
    if args.specdiff_options:
        options.update(json.loads(args.specdiff_options))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise SystemExit(f"--modes: {args.modes!r}; choose each of {list(MODES)} at most once")
    modes = [m for m in modes if not (m == "inductor" and args.no_inductor)]
    if args.dry_run and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models; several OpenMP threads only add barrier waits on a busy machine

    # one forward per step; several graphs/variants per model must never hit the recompile limit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 1024)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    inductor_config = json.loads(args.inductor_config) if args.inductor_config else {}
    if not isinstance(inductor_config, dict):
        raise SystemExit(f"--inductor-config: a JSON dict, got {args.inductor_config!r}")
    from torch._inductor import config as inductor_settings

    settings = contextlib.ExitStack()
    try:  # an unknown key is refused here, before any model is built
        settings.enter_context(inductor_settings.patch(inductor_config))
    except (AttributeError, TypeError) as e:
        raise SystemExit(f"--inductor-config: {e}") from None
    threads = torch.get_num_threads()
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU ({threads} thread{'s' if threads != 1 else ''})")
    print(f"gpu_latency: {where}, torch {torch.__version__}, {dtype}, {steps} steps, modes {modes}, "
          f"specdiff options {options}, Inductor config {inductor_config}{' [dry run]' if args.dry_run else ''}")

    results: list[ModeResult] = []
    t0 = time.perf_counter()
    def keep(result: ModeResult) -> None:  # partial results survive a timeout
        results.append(result)
        Path(args.out).write_text(format_table(results) + "\n")

    with settings, warnings.catch_warnings():
        warnings.simplefilter("default")
        for name in names:
            benchmark_model(specs[name], device, dtype, steps=steps, timed=timed, modes=modes,
                            specdiff_options=options, seed=args.seed, on_result=keep, split=args.split,
                            device_time=args.device_time)
    table = format_table(results)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s; table written to {args.out}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
