"""Evaluation protocol: specdiff and diffusers' caches on every zoo model, sampled as the pipelines sample.

A *cell* is (model, sampler, steps). Every method runs on every cell on the same prompts and
initial noise, and is scored against eager full compute of the same cell.

Models. ``specdiff_zoo.MODELS`` (name -> ``ZooModel(name, family, split, image_size, ...)``,
``split`` "tune" or "heldout"), loaded with ``specdiff_zoo.load_shapes_dit(name)``; while the
registry does not exist, the two trained models ``sd3`` and ``flux``, both "tune". Defaults are
chosen on tune models only; the held-out numbers are the ones to publish.

Samplers (each a function ``sample(model, transformer, prompts, noise, steps) -> [B, 3, S, S]``
in [-1, 1]; ``transformer`` is the eager module, a ``torch.compile``d one or a cache wrapper):

* ``sd3_cfg`` (SD3-architecture models), as ``StableDiffusion3Pipeline.__call__``:
  ``FlowMatchEulerDiscreteScheduler(shift=3.0)``, ``set_timesteps(n)``; batched CFG: latents
  ``[uncond, cond]`` concatenated, ``timestep = t.expand(2B)`` (the scheduler's timestep, sigma *
  1000), ``noise_pred.chunk(2)``, ``uncond + g * (cond - uncond)`` with g the model's
  ``default_guidance_scale`` (4.0), uncond prompt ``""``; ``scheduler.step``.
* ``flux_truecfg`` / ``flux_nocfg`` (FLUX-architecture models), as ``FluxPipeline.__call__``:
  the scheduler configured like FLUX.1-dev's (shift 3.0, dynamic shifting, base/max shift 0.5 /
  1.15, base/max image sequence length 256 / 4096), sigmas ``np.linspace(1.0, 1/n, n)``, ``mu``
  from the packed image token count by diffusers' own ``calculate_shift`` and
  ``retrieve_timesteps``, ``set_begin_index(0)``, ``timestep / 1000`` to the transformer, the
  guidance embedding input 3.5 (``torch.full([1], 3.5).expand(B)``), ``txt_ids`` zeros,
  ``img_ids`` (0, row, col), ``joint_attention_kwargs={}``. Each call runs inside
  ``transformer.cache_context("cond")`` when the transformer has that method (diffusers' FLUX
  model does, a compiled module forwards the attribute, and the cache wrapper below has its own).
  ``flux_truecfg`` adds a second call per step inside ``cache_context("uncond")`` with the
  prompt ``""`` and combines ``uncond + 4.0 * (cond - uncond)``; ``flux_nocfg`` makes one call.
* ``flux_truecfg_renorm`` (FLUX-architecture models; only when asked for with ``--samplers``):
  ``flux_truecfg`` with the guided velocity rescaled per token to the cond output's norm
  (``comb * |cond| / |comb|`` over each token's channels), as ``QwenImagePipeline`` runs its true
  CFG.
* ``sd3_slg`` (SD3-architecture models; only when asked for with ``--samplers``): ``sd3_cfg``
  with SD3.5's skip-layer guidance as ``StableDiffusion3Pipeline`` runs it
  (``skip_guidance_layers``, scale 2.8, start 0.01, stop 0.2): on the steps ``i`` with ``0.01 n <
  i < 0.2 n`` a second call on the cond latents and prompt with ``skip_layers`` (the model's
  blocks at 30 % of its depth, as SD3.5-medium's ``[7, 8, 9]`` of 24; :func:`slg_layers`),
  added as ``2.8 * (cond - skipped)``. A call with ``skip_layers`` is another graph to Dynamo.
* ``sd3_heun`` (SD3-architecture models; only when asked for with ``--samplers``): ``sd3_cfg``
  with the pipeline's scheduler swapped for ``FlowMatchHeunDiscreteScheduler(shift=3.0)``: each
  step but the last calls the transformer at its start sigma and again at its end sigma on the
  Euler-predicted latent (the corrector); the next step's first call runs at that end sigma on
  the corrected latent; ``n`` steps are ``2n - 1`` calls.
* ``sd3_unipc`` (SD3-architecture models; only when asked for with ``--samplers``): ``sd3_cfg``
  with ``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
  flow_shift=3.0)`` (the scheduler Wan's pipelines run; order 2 with its corrector): each update
  combines the last two outputs; one call per step.

Steps 20, 28 and 50. Prompts: the 8 of ``ablation.py --robustness`` (``sweep.PROMPTS +
ablation.MORE_PROMPTS``), seeds 0 and 1. Initial noise: for seed ``s``, ``torch.randn(8, 3, S, S, generator=
torch.Generator().manual_seed(s))``, row ``p`` for prompt ``p`` (what a pipeline draws with one
generator for a list of 8 prompts); FLUX packs it into 2x2 tokens. All prompts of one seed run
as one batch, except FirstBlockCache: its skip decision compares the first block's residual
averaged over the whole batch, so batching 8 unrelated prompts would decide for all of them at
once; it runs one prompt per generation, as a user generating one image would (its eager
baseline for speed runs the same way). ``--one-prompt`` runs specdiff that way too: its
controller then decides for each image alone instead of for the batch.

Methods (``(label, kind, params)``): ``eager`` (the reference: full compute, plain module),
``bf16`` (full compute under ``torch.autocast(bfloat16)``, outputs in float32: what computing
every token in the precision DiTs run in on GPUs costs against the float32 reference),
``specdiff`` with an options dict (``torch.compile(transformer, backend="specdiff",
options={..., "inductor": False})`` for fidelity: one compiled module per options dict and model,
reused across that model's cells; ``specdiff_fx.reset()`` before each generation), and
diffusers' caches through ``benchmarks/diffusers_caches.py`` (TaylorSeer, FirstBlockCache,
MagCache, FasterCache, PAB; MagCache's ratios are calibrated with diffusers' calibration mode per
cell, with the cell's sampler, on other prompts and another seed; FasterCache on FLUX models runs
with ``is_guidance_distilled=True``: FLUX has no batched [uncond, cond] call whose halves it
could split, so only its attention reuse applies).

Cache contexts (FLUX true CFG: a "cond" and an "uncond" call per step). Stock diffusers keys
the state of TaylorSeer, FirstBlockCache and MagCache by the context name (``StateManager``),
so the two calls keep separate states (MagCache: one calibrated ratio list for both, calibrated
from the "cond" context). PAB and FasterCache keep one state on each hook, which stock diffusers
shares across contexts: the "uncond" call would reuse attention the "cond" call cached and
advance the same counters. ``diffusers_caches.CacheHandle.context`` gives those hooks one state
per context name, so here every cache keeps each context separate
(``test_diffusers_caches_smoke.py`` checks that a "cond" stream is unchanged by interleaved
"uncond" calls, for every cache). specdiff tells the two calls apart by itself (same latent, same
timestep: a second branch) and its report covers both.

Metrics per cell and method, over the prompts x seeds: mean and worst-image PSNR and SSIM against
eager full compute (``specdiff_fx.metrics`` per image; an image identical to the reference counts
as 100 dB), and the FLOPs executed as a fraction of full compute: specdiff's from the reports of
the generation's graphs (``specdiff_fx.track()``; :func:`flops_fraction`, speculative calls
included; ``sd3_slg`` runs two graphs); the caches' counted around
the eager, hooked generation with ``torch.utils.flop_counter.FlopCounterMode``'s formulas
(:func:`count_flops`: the totals of ``diffusers_caches.count_flops``, at a fraction of its
overhead), over the same count for eager. (A dispatch mode around a *compiled* call makes Dynamo
run the Python function instead, so specdiff is never counted that way.)

Speed (``--speed``, separate phase): per model, 28 steps, the model's first selected sampler
(``sd3_cfg``, ``flux_truecfg``), one batch (seed 0): each method against eager side by side in
this process, after a warm-up generation of each (compilation included), ``--speed-repeats``
alternating eager/method pairs, speedup = median of the per-pair ratios (the table also gives the
lowest and highest: one slow run on a shared VM moves a 3-pair median); specdiff here compiled
with Inductor (``inductor=True``). The plots use it on the x axis; without ``--speed`` they use
1 / FLOPs fraction and say so on the axis.

Outputs (with ``--write``, into ``--out``, default ``benchmarks/protocol/``): ``protocol.json``
(every number, per image too; machine, versions, date, command line), ``protocol.md`` (models
and splits, one row per (model, sampler, steps, method), the specdiff-defaults summary over the
held-out cells against the targets: mean PSNR >= 30 dB, worst image >= 25 dB, FLOPs <= 35 %,
with the ``bf16`` reference's mean and worst PSNR of the same cells next to them where it ran;
each model's curve, and per cache setting the specdiff setting at no more FLOPs above it:
``curve_markdown``) and ``<model>.png`` per model (PSNR against speed, one marker per method:
the mean over the model's cells, a segment down to the worst image).

    python benchmarks/protocol.py --write                    # everything (see the time estimate)
    python benchmarks/protocol.py --models sd3 --samplers sd3_cfg --steps 28
    python benchmarks/protocol.py --split heldout --speed --write
    python benchmarks/protocol.py --specdiff '{"cache_ratio": 0.9}' --specdiff '{}' --methods eager,specdiff
    python benchmarks/protocol.py --tiny                     # CI: seconds, no files unless --write

Wall time (no ``--speed``), measured on the shared 2-core CPU VM (load average 4-6 from other jobs,
1 torch thread), the 15 default methods of then (before the bf16 reference), 8 prompts x 2 seeds:
one sd3_cfg cell 6.4 min at 28 steps; both FLUX samplers 15.7 min at 20 steps. Time grows with the steps, so the full run over the models
present today (sd3, flux; 9 cells) takes about 6.4 x 98/28 + 15.7 x 98/20 = 22 + 77 = 100 min; each
further 256-token model adds its family's share (SD3 ~22, FLUX ~77 min), a 1024-token one at least
4x that per call (not measured). ``--methods eager,specdiff`` takes about a third. ``--speed`` adds,
per model, an Inductor compile per specdiff setting (2.6 min on that VM) and 2 + 2 x repeats
28-step generations per method.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import specdiff_fx  # noqa: E402
import specdiff_zoo  # noqa: E402
from benchmarks import diffusers_caches as dc  # noqa: E402
from benchmarks.ablation import MORE_PROMPTS  # noqa: E402
from benchmarks.plotting import Point, scatter  # noqa: E402
from benchmarks.sweep import PROMPTS as SWEEP_PROMPTS  # noqa: E402
from specdiff_fx import metrics  # noqa: E402
from specdiff_zoo import ShapesModel, pack_pixels, pixel_ids, unpack_pixels  # noqa: E402

PROMPTS: list[str] = [*SWEEP_PROMPTS, *MORE_PROMPTS]
SEEDS: tuple[int, ...] = (0, 1)
STEPS: tuple[int, ...] = (20, 28, 50)
SPEED_STEPS = 28

#: SD3 pipelines' scheduler (SD3 / SD3.5 ship FlowMatchEulerDiscreteScheduler with shift 3.0)
SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
#: FLUX.1-dev's scheduler config
FLUX_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                                  "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                                  "max_image_seq_len": 4096}
FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale (the guidance embedding input)
TRUE_CFG_SCALE = 4.0
NEGATIVE_PROMPT = ""

PSNR_CAP = 100.0  # dB given to an image identical to its reference
TARGETS = {"mean_psnr": 30.0, "worst_psnr": 25.0, "flops": 0.35}

#: models used while ``specdiff_zoo.MODELS`` does not exist: (name, family, split)
FALLBACK_MODELS: list[tuple[str, str, str]] = [("sd3", "sd3", "tune"), ("flux", "flux", "tune")]


# ---------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    split: str


def zoo_models() -> list[ModelEntry]:
    """Every model of the zoo registry (or :data:`FALLBACK_MODELS` without one)."""
    registry = getattr(specdiff_zoo, "MODELS", None)
    if registry is None:
        return [ModelEntry(*m) for m in FALLBACK_MODELS]
    return [ModelEntry(m.name, m.family, m.split) for m in registry.values()]


def image_size(model: ShapesModel) -> int:
    size = getattr(model, "image_size", None)
    return int(size if size is not None else model.config.get("image_size", 32))


# ---------------------------------------------------------------------------------------------
# samplers


def _cache_context(transformer: Any, name: str) -> contextlib.AbstractContextManager:
    """``transformer.cache_context(name)`` where the transformer has one (as FluxPipeline does)."""
    fn = getattr(transformer, "cache_context", None)
    return fn(name) if callable(fn) else contextlib.nullcontext()


def guide(sampler: str, model: ShapesModel, outs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The velocity one step of ``sampler`` moves the latent with, from the step's transformer
    outputs in call order: ``sd3_cfg`` one output whose halves are ``[uncond; cond]``, combined
    with the model's ``default_guidance_scale``; ``flux_truecfg`` the "cond" then the "uncond"
    call, combined with :data:`TRUE_CFG_SCALE` (``flux_truecfg_renorm``: then rescaled per token as
    ``QwenImagePipeline`` does); ``flux_nocfg`` its one output."""
    if sampler == "sd3_cfg":
        uncond, cond = outs[0].chunk(2)
        return uncond + float(model.config.get("default_guidance_scale", 4.0)) * (cond - uncond)
    if sampler in ("flux_truecfg", "flux_truecfg_renorm"):
        cond, uncond = outs
        comb = uncond + TRUE_CFG_SCALE * (cond - uncond)
        if sampler == "flux_truecfg_renorm":  # QwenImagePipeline: each token keeps the cond output's norm
            comb = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return comb
    if sampler == "flux_nocfg":
        return outs[0]
    raise ValueError(f"unknown sampler {sampler!r}")


#: SD3.5 skip-layer guidance as ``StableDiffusion3Pipeline.__call__``'s defaults (scale, start, stop)
SLG_SCALE, SLG_START, SLG_STOP = 2.8, 0.01, 0.2


def slg_layers(num_layers: int) -> list[int]:
    """The blocks skip-layer guidance leaves out: those at 29-38 % of the depth (SD3.5-medium's
    recommended ``[7, 8, 9]`` of 24); below 12 blocks the one at 30 %."""
    if num_layers >= 12:
        return list(range(round(0.29 * num_layers), round(0.38 * num_layers) + 1))
    return [round(0.3 * num_layers)]


def sd3_scheduler(kind: str) -> Any:
    """The scheduler of an SD3 sampler: ``"euler"`` the pipeline's own; ``"heun"`` and ``"unipc"``
    what a user swaps in (``FlowMatchHeunDiscreteScheduler``; ``UniPCMultistepScheduler`` with flow
    sigmas, as Wan's pipelines configure it), both at shift 3."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler

    if kind == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=SD3_SCHEDULER["shift"])
    return {"euler": FlowMatchEulerDiscreteScheduler, "heun": FlowMatchHeunDiscreteScheduler}[kind](**SD3_SCHEDULER)


def sample_sd3_cfg(model: ShapesModel, transformer: Callable[..., Any], prompts: Sequence[str],
                   noise: torch.Tensor, steps: int, skip_layer_guidance: bool = False, scheduler: str = "euler"
                   ) -> torch.Tensor:
    """``StableDiffusion3Pipeline``'s loop: shift-3 flow-matching Euler, batched CFG (with
    ``skip_layer_guidance``, SD3.5's skip-layer guidance as well; with another ``scheduler``, the
    pipeline with that one swapped in, :func:`sd3_scheduler`: the same loop over its timesteps)."""
    scheduler = sd3_scheduler(scheduler)
    scheduler.set_timesteps(steps, device=model.device)
    b = len(prompts)
    hidden, pooled = model.encode(list(prompts))
    null_hidden, null_pooled = model.encode([NEGATIVE_PROMPT] * b)
    hidden, pooled = torch.cat([null_hidden, hidden]), torch.cat([null_pooled, pooled])
    latents = noise.to(model.device, model.dtype)
    skip = slg_layers(int(model.config["transformer"]["num_layers"])) if skip_layer_guidance else None
    for i, t in enumerate(scheduler.timesteps):
        latent_input = torch.cat([latents] * 2)
        timestep = t.expand(latent_input.shape[0])
        pred = transformer(hidden_states=latent_input, timestep=timestep, encoder_hidden_states=hidden,
                           pooled_projections=pooled, joint_attention_kwargs=None, return_dict=False)[0]
        velocity = guide("sd3_cfg", model, [pred])
        if skip is not None and steps * SLG_START < i < steps * SLG_STOP:
            skipped = transformer(hidden_states=latents, timestep=t.expand(b), encoder_hidden_states=hidden[b:],
                                  pooled_projections=pooled[b:], joint_attention_kwargs=None, return_dict=False,
                                  skip_layers=skip)[0]
            velocity = velocity + SLG_SCALE * (pred.chunk(2)[1] - skipped)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents.float().clamp(-1, 1)


def sample_sd3_slg(model, transformer, prompts, noise, steps) -> torch.Tensor:
    """``sd3_cfg`` with SD3.5's skip-layer guidance (a second call on some steps)."""
    return sample_sd3_cfg(model, transformer, prompts, noise, steps, skip_layer_guidance=True)


def sample_sd3_heun(model, transformer, prompts, noise, steps) -> torch.Tensor:
    """``sd3_cfg`` with ``FlowMatchHeunDiscreteScheduler`` (two calls per step but the last)."""
    return sample_sd3_cfg(model, transformer, prompts, noise, steps, scheduler="heun")


def sample_sd3_unipc(model, transformer, prompts, noise, steps) -> torch.Tensor:
    """``sd3_cfg`` with ``UniPCMultistepScheduler`` (flow sigmas, shift 3; order 2 with its corrector)."""
    return sample_sd3_cfg(model, transformer, prompts, noise, steps, scheduler="unipc")


@functools.lru_cache(maxsize=1)
def _flux_pipeline_functions() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """diffusers' own ``calculate_shift`` and ``retrieve_timesteps`` of ``FluxPipeline`` (their
    module imports transformers: seconds, so only when a FLUX cell runs)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its notes on image processors we never use
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
    return calculate_shift, retrieve_timesteps


def flux_timesteps(steps: int, image_seq_len: int, device: torch.device | str = "cpu"):
    """``(scheduler, timesteps)`` exactly as ``FluxPipeline.__call__`` sets them up."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    calculate_shift, retrieve_timesteps = _flux_pipeline_functions()
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                         scheduler.config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler, timesteps


def _sample_flux(model: ShapesModel, transformer: Callable[..., Any], prompts: Sequence[str], noise: torch.Tensor,
                 steps: int, true_cfg: bool, renorm: bool = False) -> torch.Tensor:
    size = noise.shape[-1]
    b = len(prompts)
    latents = pack_pixels(noise.to(model.device, model.dtype))
    scheduler, timesteps = flux_timesteps(steps, latents.shape[1], model.device)
    hidden, pooled = model.encode(list(prompts))
    if true_cfg:
        neg_hidden, neg_pooled = model.encode([NEGATIVE_PROMPT] * b)
    guidance = torch.full([1], FLUX_GUIDANCE, device=model.device, dtype=torch.float32).expand(b)
    img_ids = pixel_ids(size, size, device=model.device).to(model.dtype)
    txt_ids = torch.zeros(hidden.shape[1], 3, device=model.device, dtype=model.dtype)
    for t in timesteps:
        timestep = t.expand(b).to(latents.dtype)
        with _cache_context(transformer, "cond"):
            pred = transformer(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=txt_ids,
                               img_ids=img_ids, joint_attention_kwargs={}, return_dict=False)[0]
        outs = [pred]
        if true_cfg:
            with _cache_context(transformer, "uncond"):
                outs.append(transformer(hidden_states=latents, timestep=timestep / 1000, guidance=guidance,
                                        pooled_projections=neg_pooled, encoder_hidden_states=neg_hidden,
                                        txt_ids=txt_ids, img_ids=img_ids, joint_attention_kwargs={},
                                        return_dict=False)[0])
        velocity = guide(("flux_truecfg_renorm" if renorm else "flux_truecfg") if true_cfg else "flux_nocfg", model, outs)
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return unpack_pixels(latents, size, size).float().clamp(-1, 1)


def sample_flux_truecfg(model, transformer, prompts, noise, steps) -> torch.Tensor:
    """``FluxPipeline``'s loop with true CFG: a "cond" and an "uncond" call per step."""
    return _sample_flux(model, transformer, prompts, noise, steps, true_cfg=True)


def sample_flux_truecfg_renorm(model, transformer, prompts, noise, steps) -> torch.Tensor:
    """``flux_truecfg`` with ``QwenImagePipeline``'s per-token rescale of the guided velocity."""
    return _sample_flux(model, transformer, prompts, noise, steps, true_cfg=True, renorm=True)


def sample_flux_nocfg(model, transformer, prompts, noise, steps) -> torch.Tensor:
    """``FluxPipeline``'s loop without true CFG: one call per step (guidance embedding only)."""
    return _sample_flux(model, transformer, prompts, noise, steps, true_cfg=False)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "sd3_cfg": sample_sd3_cfg,
    "flux_truecfg": sample_flux_truecfg,
    "flux_nocfg": sample_flux_nocfg,
    "sd3_slg": sample_sd3_slg,
    "sd3_heun": sample_sd3_heun,
    "sd3_unipc": sample_sd3_unipc,
    "flux_truecfg_renorm": sample_flux_truecfg_renorm,
}
#: the samplers of the protocol's cells, per family
SAMPLERS_BY_FAMILY: dict[str, tuple[str, ...]] = {"sd3": ("sd3_cfg",), "flux": ("flux_truecfg", "flux_nocfg")}
#: more samplers a family runs only when ``--samplers`` names them
EXTRA_SAMPLERS_BY_FAMILY: dict[str, tuple[str, ...]] = {"sd3": ("sd3_slg", "sd3_heun", "sd3_unipc"), "flux": ("flux_truecfg_renorm",)}
#: transformer calls per denoising step: true CFG calls once for "cond" and once for "uncond"
#: (``sd3_slg``: one, and a second on the skip-layer steps)
CALLS_PER_STEP: dict[str, int] = {"sd3_cfg": 1, "flux_truecfg": 2, "flux_nocfg": 1, "sd3_slg": 1,
                                  "flux_truecfg_renorm": 2}


def initial_noise(seed: int, size: int, n: int) -> torch.Tensor:
    """Noise of prompts ``0..n-1`` for ``seed``: rows of one draw for all :data:`PROMPTS`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(max(n, len(PROMPTS)), 3, size, size, generator=gen)[:n]


# ---------------------------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # "eager", "bf16", "specdiff" or a key of diffusers_caches.CACHES
    params: dict = field(default_factory=dict, hash=False)
    one_prompt: bool = False  # specdiff with --one-prompt

    @property
    def batch1(self) -> bool:
        """One prompt per generation (see the module docstring: FirstBlockCache, and specdiff
        with ``--one-prompt``)."""
        return self.one_prompt or self.kind == "first_block_cache"


class Bfloat16:
    """The transformer computing in bfloat16 (``torch.autocast``), every token on every call, its
    output returned in float32: what the same generation costs in the precision DiTs run in on
    GPUs. A reference point for the fidelity numbers, not a cache."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        device = next(self.module.parameters()).device.type  # autocast of the device the weights are on
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out = self.module(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.float() if torch.is_tensor(o) else o for o in out)
        out.sample = out.sample.float()
        return out


def _fmt(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return repr(v) if isinstance(v, str) else str(v)


#: the kinds of method that are not a diffusers cache
NOT_CACHES = ("eager", "bf16", "specdiff")


def method(kind: str, params: dict | None = None, label: str | None = None) -> Method:
    params = dict(params or {})
    if label is None:
        if kind == "specdiff" and not params:
            label = "specdiff defaults"
        else:
            label = " ".join([kind, ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())]).strip()
    return Method(label, kind, params)


#: the defaults; the speculative pre-run of the paper (2 steps), which the defaults leave off, so that
#: each model's table says whether it earns its cost; two cache ratios
DEFAULT_SPECDIFF: list[dict] = [{}, {"speculative_steps": 2}, {"cache_ratio": 0.75}, {"cache_ratio": 0.95}]
#: 2 settings per cache, a safer and a faster one (all but the last PAB one measured by the sweep,
#: benchmarks/sweep.md: SD3 model, shift 1, 28 steps)
DEFAULT_CACHES: list[tuple[str, dict]] = [
    ("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 3}),
    ("taylorseer", {"cache_interval": 4, "disable_cache_before_step": 3}),
    ("first_block_cache", {"threshold": 0.1}),
    ("first_block_cache", {"threshold": 0.3}),
    ("mag_cache", {"threshold": 0.03, "max_skip_steps": 2, "retention_ratio": 0.2}),
    ("mag_cache", {"threshold": 0.12, "max_skip_steps": 3, "retention_ratio": 0.2}),
    ("faster_cache", {"unconditional_batch_skip_range": 3}),
    ("faster_cache", {"spatial_attention_timestep_skip_range": (-1, 801),
                      "unconditional_batch_timestep_skip_range": (-1, 781), "unconditional_batch_skip_range": 5}),
    ("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 2,
                                     "spatial_attention_timestep_skip_range": (100, 800)}),
    ("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 3,
                                     "spatial_attention_timestep_skip_range": (50, 950)}),
]
TINY_CACHE = ("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 2,
                                              "spatial_attention_timestep_skip_range": (100, 800)})


def default_methods(specdiff: list[dict] | None = None, caches: list[tuple[str, dict]] | None = None) -> list[Method]:
    return ([method("eager"), method("bf16")]
            + [method("specdiff", p) for p in (DEFAULT_SPECDIFF if specdiff is None else specdiff)]
            + [method(k, p) for k, p in (DEFAULT_CACHES if caches is None else caches)])


def cache_params(model: ShapesModel, m: Method, sampler: str, steps: int) -> dict:
    """The params a cache is applied with on this cell (model-dependent fills, see the docstring)."""
    params = dict(m.params)
    if m.kind == "faster_cache" and model.family == "flux":
        params.setdefault("is_guidance_distilled", True)
    if m.kind == "mag_cache" and "mag_ratios" not in params:
        params["num_inference_steps"] = steps
        params["mag_ratios"] = dc.calibrate_mag_ratios(
            model, steps, sampler_name=sampler,
            sample=lambda runner, prompts, seed: SAMPLERS[sampler](
                model, runner, prompts, initial_noise(seed, image_size(model), len(prompts)), steps))
    return params


# ---------------------------------------------------------------------------------------------
# running


class _FlopTotal(TorchDispatchMode):
    """Adds up, per op, the formula ``FlopCounterMode`` applies to it (its own registry, which
    :func:`specdiff_fx.variants.flop_counter` extends with the CPU flash-attention kernel): the
    same total as ``diffusers_caches.count_flops`` (``test_protocol_smoke.py`` checks it on hooked
    SD3 and FLUX generations), without ``FlopCounterMode``'s per-module bookkeeping and per-op
    decomposition attempts, which doubled the time of a one-prompt generation here."""

    def __init__(self) -> None:
        super().__init__()
        from specdiff_fx.variants import flop_counter

        self.registry = flop_counter().flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``(fn(), FLOPs it executed)``, counted as ``torch.utils.flop_counter.FlopCounterMode`` counts
    (see :class:`_FlopTotal`). Eager code only: a dispatch mode around a compiled call makes
    Dynamo run the Python function instead."""
    with _FlopTotal() as mode:
        result = fn()
    return result, int(mode.total)


def log(msg: str) -> None:
    print(f"[protocol {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _per_image(images: torch.Tensor, reference: torch.Tensor) -> tuple[list[float], list[float]]:
    psnrs, ssims = [], []
    for i in range(images.shape[0]):
        p = metrics.psnr(images[i:i + 1], reference[i:i + 1])
        psnrs.append(min(p, PSNR_CAP))
        ssims.append(metrics.ssim(images[i:i + 1], reference[i:i + 1]))
    return psnrs, ssims


def _generate(sample: Callable[..., torch.Tensor], model: ShapesModel, transformer: Any, prompts: Sequence[str],
              noise: torch.Tensor, steps: int, batch1: bool, before: Callable[[], None] = lambda: None) -> torch.Tensor:
    """One generation of all ``prompts`` (or one per prompt with ``batch1``)."""
    if not batch1:
        before()
        return sample(model, transformer, prompts, noise, steps)
    outs = []
    for i, p in enumerate(prompts):
        before()
        outs.append(sample(model, transformer, [p], noise[i:i + 1], steps))
    return torch.cat(outs)


def _specdiff_generations(sample: Callable[..., torch.Tensor], model: ShapesModel, compiled: Any,
                          prompts: Sequence[str], noise: torch.Tensor, steps: int,
                          batch1: bool) -> tuple[torch.Tensor, list[Any]]:
    """The images and, per image batch, the list of its generations' reports
    (``GenerationReport``: one per compiled graph that ran, e.g. two under skip-layer guidance),
    or the compile record as text where no specdiff runtime ran."""
    reports: list[Any] = []
    active: list[Any] = []

    def finish() -> None:
        if not active:
            return
        tracker = active.pop()
        tracker.__exit__(None, None, None)
        if tracker.reports:
            reports.append(tracker.reports)
        else:
            record_ = specdiff_fx.last_record()
            reports.append(str(record_) if record_ is not None else "no compile record")

    def before() -> None:
        finish()
        specdiff_fx.reset()
        active.append(specdiff_fx.track().__enter__())

    try:
        images = _generate(sample, model, compiled, prompts, noise, steps, batch1, before=before)
    finally:
        finish()
    return images, reports


def flops_fraction(reports: Sequence[Any]) -> float:
    """The FLOPs one image batch's generations executed over computing every one of their main
    calls in full (each graph's calls at its own full cost)."""
    done = sum(sum(st.flops for st in r.steps) for r in reports)
    full = sum(len(r.main_steps) * r.full_flops for r in reports)
    return done / full if full else float("nan")


@dataclass
class Cell:
    model: str
    family: str
    split: str
    sampler: str
    steps: int


def run_fidelity(entry: ModelEntry, model: ShapesModel, cells: list[Cell], methods: list[Method],
                 prompts: list[str], seeds: Sequence[int]) -> list[dict]:
    """Every method on every cell of one model; one result dict per (cell, method)."""
    size = image_size(model)
    noise = {s: initial_noise(s, size, len(prompts)) for s in seeds}
    plain = copy.deepcopy(model.transformer)  # the reference: never hooked, never compiled
    spec_base = copy.deepcopy(model.transformer)  # what specdiff compiles
    results: list[dict] = []
    refs: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
    full_flops: dict[tuple[str, int], int] = {}
    need_count = any(m.kind not in NOT_CACHES for m in methods)
    for cell in cells:
        sample = SAMPLERS[cell.sampler]
        key = (cell.sampler, cell.steps)
        t0 = time.perf_counter()
        refs[key] = {}
        for s in seeds:
            if need_count and s == seeds[0]:  # FLOPs of eager are the same for every seed
                refs[key][s], full_flops[key] = count_flops(
                    lambda: sample(model, plain, prompts, noise[s], cell.steps))
            else:
                refs[key][s] = sample(model, plain, prompts, noise[s], cell.steps)
        log(f"{entry.name} {cell.sampler} {cell.steps} steps: eager reference ({time.perf_counter() - t0:.1f} s)")

    def record(cell: Cell, m: Method, outs: dict[int, torch.Tensor], flops: list[float], seconds: float,
               extra: dict | None = None) -> None:
        psnrs, ssims = [], []
        for s in seeds:
            p, q = _per_image(outs[s], refs[(cell.sampler, cell.steps)][s])
            psnrs += p
            ssims += q
        row = {**asdict(cell), "method": m.label, "kind": m.kind, "params": m.params,
               # every option as the library resolved it: the same params mean other options once a default changes
               **({"config": specdiff_fx.SpecDiffConfig.from_options(m.params).to_dict()} if m.kind == "specdiff" else {}),
               "images": len(psnrs), "mean_psnr": statistics.fmean(psnrs), "worst_psnr": min(psnrs),
               "mean_ssim": statistics.fmean(ssims), "worst_ssim": min(ssims),
               "flops": statistics.fmean(flops) if flops else float("nan"), "flops_per_generation": flops,
               "psnr": psnrs, "ssim": ssims, "seconds": seconds, "speedup": None, **(extra or {})}
        results.append(row)
        log(f"{entry.name} {cell.sampler} {cell.steps} | {m.label} | PSNR {row['mean_psnr']:.2f} / "
            f"{row['worst_psnr']:.2f} dB | SSIM {row['mean_ssim']:.4f} / {row['worst_ssim']:.4f} | "
            f"FLOPs {row['flops']:.1%} | {seconds:.1f} s")

    for m in methods:
        if m.kind == "eager":
            for cell in cells:
                record(cell, m, refs[(cell.sampler, cell.steps)], [1.0], 0.0)
            continue
        if m.kind == "bf16":
            low = Bfloat16(plain)
            for cell in cells:
                t0 = time.perf_counter()
                outs = {s: _generate(SAMPLERS[cell.sampler], model, low, prompts, noise[s], cell.steps, False)
                        for s in seeds}
                record(cell, m, outs, [1.0], time.perf_counter() - t0)
            continue
        if m.kind == "specdiff":
            torch._dynamo.reset()
            compiled = torch.compile(spec_base, backend="specdiff", options={**m.params, "inductor": False})
            for cell in cells:
                t0 = time.perf_counter()
                outs, flops, calls = {}, [], []
                for s in seeds:
                    outs[s], reports = _specdiff_generations(SAMPLERS[cell.sampler], model, compiled, prompts,
                                                             noise[s], cell.steps, m.batch1)
                    for group in reports:
                        if isinstance(group, str):  # no specdiff runtime ran: the untouched graph did
                            flops.append(1.0)
                            calls.append({"untouched_graph": group})
                            continue
                        flops.append(flops_fraction(group))
                        for rep in group:
                            calls.append({
                                "speculative": rep.count("speculative"), "full": rep.count("full"),
                                "cached": rep.count("cached"), "skipped": rep.count("skipped"),
                                "branches": len({st.branch for st in rep.steps}),
                                "context_cached": rep.context_cached, "compiles": rep.compiles,
                                "notes": list(rep.notes)})
                record(cell, m, outs, flops, time.perf_counter() - t0, {"specdiff_calls": calls, "batch1": m.batch1})
            torch._dynamo.reset()
            continue
        for cell in cells:
            t0 = time.perf_counter()
            params = cache_params(model, m, cell.sampler, cell.steps)
            runner = dc.cached_sampler(model, m.kind, params, num_steps=cell.steps, auto_reset=False)
            outs, flops = {}, []
            try:
                for s in seeds:
                    outs[s], counted = count_flops(lambda: _generate(
                        SAMPLERS[cell.sampler], model, runner, prompts, noise[s], cell.steps, m.batch1,
                        before=runner.reset))
                    flops.append(counted / full_flops[(cell.sampler, cell.steps)])
            finally:
                runner.remove()
            shown = {k: v for k, v in params.items() if k != "mag_ratios"}
            record(cell, m, outs, flops, time.perf_counter() - t0,
                   {"applied_params": shown, "batch1": m.batch1,
                    **({"mag_ratios": [float(x) for x in params["mag_ratios"]]} if "mag_ratios" in params else {})})
    return results


def _clock(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_speed(entry: ModelEntry, model: ShapesModel, sampler: str, methods: list[Method], prompts: list[str],
              repeats: int, steps: int = SPEED_STEPS) -> list[dict]:
    """Each method against eager, side by side (see the module docstring)."""
    noise = initial_noise(SEEDS[0], image_size(model), len(prompts))
    plain = copy.deepcopy(model.transformer)
    spec_base = copy.deepcopy(model.transformer)
    sample = SAMPLERS[sampler]
    rows = []
    for m in methods:
        if m.kind in ("eager", "bf16"):  # bf16: a fidelity reference (CPU bfloat16 says nothing of GPU speed)
            continue
        runner: Any = None
        before: Callable[[], None] = lambda: None  # noqa: E731
        if m.kind == "specdiff":
            torch._dynamo.reset()
            runner = torch.compile(spec_base, backend="specdiff", options={**m.params, "inductor": True})
            before = specdiff_fx.reset
        else:
            runner = dc.cached_sampler(model, m.kind, cache_params(model, m, sampler, steps), num_steps=steps,
                                       auto_reset=False)
            before = runner.reset
        try:
            def gen() -> Any:
                return _generate(sample, model, runner, prompts, noise, steps, m.batch1, before=before)

            def eager() -> Any:
                return _generate(sample, model, plain, prompts, noise, steps, m.batch1)

            warm = _clock(gen)
            _clock(eager)
            pairs = []
            for _ in range(repeats):
                te = _clock(eager)
                tm = _clock(gen)
                pairs.append((te, tm))
        finally:
            if hasattr(runner, "remove"):
                runner.remove()
            if m.kind == "specdiff":
                torch._dynamo.reset()
        row = {"model": entry.name, "sampler": sampler, "steps": steps, "method": m.label, "kind": m.kind,
               "speedup": statistics.median(te / tm for te, tm in pairs),
               "seconds": statistics.median(tm for _, tm in pairs),
               "eager_seconds": statistics.median(te for te, _ in pairs),
               "first_seconds": warm, "pairs": pairs, "batch1": m.batch1}
        rows.append(row)
        lo, hi = pair_range(pairs)
        log(f"speed {entry.name} {sampler} {steps} | {m.label} | {row['speedup']:.2f}x, pairs {lo:.2f}-{hi:.2f}x "
            f"({row['seconds']:.2f} s vs eager {row['eager_seconds']:.2f} s; first call {warm:.1f} s)")
    return rows


# ---------------------------------------------------------------------------------------------
# reporting


def pair_range(pairs: Sequence[Sequence[float]]) -> tuple[float, float]:
    """The lowest and highest per-pair speedup (eager seconds over method seconds): a slow
    run on a shared VM moves one pair, and with few pairs the median."""
    ratios = [te / tm for te, tm in pairs]
    return min(ratios), max(ratios)


def _git() -> dict:
    def out(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": out("rev-parse", "HEAD"), "dirty": bool(out("status", "--porcelain", "--untracked-files=no"))}


def machine_info() -> dict:
    import diffusers

    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "load_average": os.getloadavg()}


def summary_rows(results: list[dict], split: str = "heldout") -> list[dict]:
    """The specdiff defaults on every ``split`` cell, plus one row over all of them."""
    rows = [r for r in results if r["kind"] == "specdiff" and not r["params"] and r["split"] == split]
    if not rows:
        return []
    low = {(r["model"], r["sampler"], r["steps"]): r for r in results if r["kind"] == "bf16"}

    def bf16(rs: list[dict]) -> dict:  # the bfloat16 reference on the same cells, where it ran on all of them
        refs = [low.get((r["model"], r["sampler"], r["steps"])) for r in rs]
        if not refs or None in refs:
            return {}
        every = [p for r in refs for p in r["psnr"]]
        return {"bf16_mean_psnr": statistics.fmean(every), "bf16_worst_psnr": min(every)}

    out = [{"cell": f"{r['model']} / {r['sampler']} / {r['steps']}", "mean_psnr": r["mean_psnr"],
            "worst_psnr": r["worst_psnr"], "flops": r["flops"], **bf16([r])} for r in rows]
    every = [p for r in rows for p in r["psnr"]]
    out.append({"cell": f"all {len(rows)} {split} cells ({len(every)} images; FLOPs: the highest cell)",
                "mean_psnr": statistics.fmean(every), "worst_psnr": min(every), "flops": max(r["flops"] for r in rows),
                **bf16(rows)})
    for o in out:
        o["meets"] = {"mean_psnr": o["mean_psnr"] >= TARGETS["mean_psnr"],
                      "worst_psnr": o["worst_psnr"] >= TARGETS["worst_psnr"], "flops": o["flops"] <= TARGETS["flops"]}
    return out


def curve_rows(results: Sequence[dict], model: str | None = None) -> list[dict]:
    """Per method (``model``'s cells, or every cell): its kind and params, cells (and their
    ``(model, sampler, steps)`` keys), mean of the
    cells' mean PSNR, lowest cell, lowest worst image, cells whose every image reaches the
    protocol's worst-image target, FLOPs mean / lowest / highest over the cells; sorted by mean
    FLOPs. The curve of a model's plot and of ``protocol_merge``'s tables."""
    rows = []
    mine = [r for r in results if r["kind"] != "eager" and (model is None or r["model"] == model)]
    for label in dict.fromkeys(r["method"] for r in mine):
        cells = [r for r in mine if r["method"] == label]
        flops = [r["flops"] for r in cells]
        rows.append({"method": label, "kind": cells[0]["kind"], "params": cells[0]["params"], "cells": len(cells),
                     "cell_keys": frozenset((r["model"], r["sampler"], r["steps"]) for r in cells),
                     "mean_psnr": statistics.fmean(r["mean_psnr"] for r in cells),
                     "lowest_cell": min(r["mean_psnr"] for r in cells),
                     "worst_psnr": min(r["worst_psnr"] for r in cells),
                     "cells_worst_ok": sum(r["worst_psnr"] >= TARGETS["worst_psnr"] for r in cells),
                     "flops": statistics.fmean(flops), "flops_low": min(flops), "flops_high": max(flops)})
    return sorted(rows, key=lambda r: r["flops"])


def _highest_mean(rows: list[dict]) -> dict | None:
    return max(rows, key=lambda r: r["mean_psnr"]) if rows else None


def dominance_rows(results: Sequence[dict], model: str | None = None, rows: list[dict] | None = None) -> list[dict]:
    """The target "specdiff's curve lies above every cache's", per cache setting: on ``model``'s
    cells (or every cell), each setting that is neither specdiff nor a reference (eager, bf16)
    against the specdiff settings measured on the same cells at no more mean FLOPs (FLOPs are the
    speed axis). ``above_mean``: the specdiff setting among those with the highest mean of cells'
    mean PSNR, when it is higher than the cache's (else ``None``); ``above_both``: among those that
    are higher on the mean *and* no lower on the lowest worst image, the one with the highest
    mean (else ``None``). Only settings measured on the same cells are compared. A cache setting
    whose ``above_both`` is ``None`` lies above specdiff's measured points on the worst image or
    the mean. Sorted by the cache's FLOPs. ``rows``: :func:`curve_rows` of the same results and
    model, where the caller has them already."""
    rows = curve_rows(results, model) if rows is None else rows
    out = []
    for c in rows:
        if c["kind"] in NOT_CACHES:
            continue
        cheaper = [s for s in rows if s["kind"] == "specdiff" and s["cell_keys"] == c["cell_keys"]
                   and s["flops"] <= c["flops"] and s["mean_psnr"] > c["mean_psnr"]]
        both = [s for s in cheaper if s["worst_psnr"] >= c["worst_psnr"]]
        out.append({"method": c["method"], "kind": c["kind"], "cells": c["cells"], "mean_psnr": c["mean_psnr"],
                    "worst_psnr": c["worst_psnr"], "flops": c["flops"], "above_mean": _highest_mean(cheaper),
                    "above_both": _highest_mean(both)})
    return out


def _ok(flag: bool) -> str:
    return "yes" if flag else "**no**"


def markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"# Evaluation protocol ({data['date']})", "",
             f"Command: `{data['command']}`", "",
             f"Machine: {m['platform']}, {m['cpus']} CPUs, {m['torch_threads']} torch thread(s), load average "
             f"{m['load_average'][0]:.2f} at start; Python {m['python']}, torch {m['torch']}, diffusers {m['diffusers']}; "
             f"git {data['git']['commit'][:12]}{' (dirty)' if data['git']['dirty'] else ''}. Wall time "
             f"{data['wall_seconds'] / 60:.1f} min.", "",
             f"Prompts: {len(data['prompts'])}, seeds {data['seeds']}: {data['images_per_cell']} images per cell. "
             "PSNR/SSIM per image against eager full compute (identical = 100 dB), mean and worst image; FLOPs "
             "executed over full compute (specdiff: its report; caches: counted). Protocol: "
             "`benchmarks/protocol.py` docstring.", "",
             "## Models", "", "| model | family | split | image size | image tokens |", "|---|---|---|---|---|"]
    for md in data["models"]:
        lines.append(f"| {md['name']} | {md['family']} | {md['split']} | {md['image_size']} | {md['image_tokens']} |")
    lines += ["", "## Specdiff defaults on the held-out cells", ""]
    t = TARGETS
    for split in ("heldout", "tune"):
        rows = data["summary"].get(split) or []
        if split == "tune":
            if not rows:
                break
            lines += ["", "The same on the tune cells (for reference; defaults are chosen on these):", ""]
        if not rows:
            lines.append("No held-out model in this run.")
            continue
        ref = all("bf16_mean_psnr" in r for r in rows)  # bf16: every token in bfloat16, for scale
        lines += [f"| cell | mean PSNR (≥ {t['mean_psnr']:.0f} dB) | worst PSNR (≥ {t['worst_psnr']:.0f} dB) | "
                  f"FLOPs (≤ {t['flops']:.0%}) |" + (" bf16, every token: mean / worst PSNR |" if ref else ""),
                  "|---|---|---|---|" + ("---|" if ref else "")]
        for r in rows:
            ok = r["meets"]
            lines.append(f"| {r['cell']} | {r['mean_psnr']:.2f} ({_ok(ok['mean_psnr'])}) | "
                         f"{r['worst_psnr']:.2f} ({_ok(ok['worst_psnr'])}) | {r['flops']:.1%} ({_ok(ok['flops'])}) |"
                         + (f" {r['bf16_mean_psnr']:.2f} / {r['bf16_worst_psnr']:.2f} |" if ref else ""))
    lines += ["", "## Results", "",
              "| model | sampler | steps | method | mean PSNR | worst PSNR | mean SSIM | worst SSIM | FLOPs | speedup |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        eager = r["kind"] == "eager"
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "–"
        psnr = ("ref", "ref") if eager else (f"{r['mean_psnr']:.2f}", f"{r['worst_psnr']:.2f}")
        ssim = ("ref", "ref") if eager else (f"{r['mean_ssim']:.4f}", f"{r['worst_ssim']:.4f}")
        lines.append(f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['method']} | {psnr[0]} | {psnr[1]} | "
                     f"{ssim[0]} | {ssim[1]} | {r['flops']:.1%} | {speed} |")
    if data["speed"]:
        lines += ["", f"## Speed ({SPEED_STEPS} steps, one batch of seed 0, median of the per-pair ratios)", "",
                  "| model | sampler | method | speedup vs eager | pairs: lowest-highest | s / generation | eager s "
                  "| first call s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in data["speed"]:
            lo, hi = pair_range(r["pairs"])
            lines.append(f"| {r['model']} | {r['sampler']} | {r['method']} | {r['speedup']:.2f}x | {lo:.2f}-{hi:.2f}x | "
                         f"{r['seconds']:.2f} | {r['eager_seconds']:.2f} | {r['first_seconds']:.1f} |")
    lines += ["", "Plots: " + ", ".join(f"`{md['name']}.png`" for md in data["models"]) +
              " (PSNR against speed per method: the mean over the model's cells, a segment down to the worst image).", ""]
    return "\n".join(lines)


_SHORT = {"cache_ratio": "cr", "tolerance": "tol", "sparse_calls": "sparse", "speculative_steps": "spec",
          "cache_interval": "every",
          "disable_cache_before_step": "from", "disable_cache_after_step": "until", "threshold": "thr",
          "max_skip_steps": "skip", "retention_ratio": "keep", "unconditional_batch_skip_range": "uncond",
          "unconditional_batch_timestep_skip_range": "uncond_t", "spatial_attention_block_skip_range": "every",
          "spatial_attention_timestep_skip_range": "t"}


def short_label(params: dict) -> str:
    """A few characters naming a method's parameters next to its marker."""
    if not params:
        return "defaults"
    return " ".join(f"{_SHORT.get(k, k)}={_fmt(v).replace(' ', '')}" for k, v in params.items())


def curve_markdown(data: dict) -> str:
    """Per model (and over every cell, for several models): the curve (:func:`curve_rows`) as a
    table and, where caches ran beside specdiff, the caches against it (:func:`dominance_rows`)."""
    def setting(s: dict | None) -> str:
        return f"{s['method']} ({s['mean_psnr']:.2f} / {s['worst_psnr']:.2f} dB, {s['flops']:.1%})" if s else "**none**"

    lines = []
    groups = [(f"`{md['name']}`", md["name"]) for md in data["models"]]
    if len(groups) > 1:
        groups.append(("every cell", None))
    for title, model in groups:
        rows = curve_rows(data["results"], model)
        if not rows:
            continue
        lines += ["", f"## Curve: {title} (mean over the cells, sorted by FLOPs)", "",
                  f"| method | cells | mean PSNR | lowest cell | lowest worst image | cells with worst ≥ "
                  f"{TARGETS['worst_psnr']:.0f} dB | FLOPs (range) |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {r['cells']} | {r['mean_psnr']:.2f} | {r['lowest_cell']:.2f} | "
                         f"{r['worst_psnr']:.2f} | {r['cells_worst_ok']} of {r['cells']} | {r['flops']:.1%} "
                         f"({r['flops_low']:.1%}–{r['flops_high']:.1%}) |")
        dom = dominance_rows(data["results"], model, rows)
        if dom:
            lines += ["", f"## Against the caches: {title} (the specdiff setting at no more FLOPs that is "
                      "higher on the mean, and on the mean and the lowest worst image)", "",
                      "| cache setting | mean PSNR | lowest worst image | FLOPs | specdiff above on the mean | "
                      "specdiff above on both |", "|---|---|---|---|---|---|"]
            for d in dom:
                lines.append(f"| {d['method']} | {d['mean_psnr']:.2f} | {d['worst_psnr']:.2f} | {d['flops']:.1%} | "
                             f"{setting(d['above_mean'])} | {setting(d['above_both'])} |")
            n_both = sum(d["above_both"] is not None for d in dom)
            n_mean = sum(d["above_mean"] is not None for d in dom)
            lines += ["", f"Cache settings under a specdiff setting at no more FLOPs: {n_mean} of {len(dom)} on "
                      f"the mean, {n_both} of {len(dom)} on the mean and the worst image."]
    return "\n".join(lines) + "\n"


def plot_model(data: dict, name: str, path: Path) -> None:
    speed = {r["method"]: r["speedup"] for r in data["speed"] if r["model"] == name}
    points = []
    for c in curve_rows(data["results"], name):
        x = speed.get(c["method"]) if speed else 1.0 / c["flops"]
        if x is not None:
            params, kind = c["params"], c["kind"]
            points.append(Point(kind, x, c["mean_psnr"], c["worst_psnr"],
                                short_label(params) if params or kind == "specdiff" else ""))
    if speed:
        sampler = next(r["sampler"] for r in data["speed"] if r["model"] == name)
        x_label = f"speedup vs eager (wall clock, {sampler}, {SPEED_STEPS} steps)"
    else:
        x_label = "1 / FLOPs fraction (not wall clock: run with --speed)"
    scatter(points, path, x_label=x_label, y_label="PSNR vs full compute (dB)",
            title=f"{name}: mean over its cells, segment to the worst image", size=(960, 600))


# ---------------------------------------------------------------------------------------------
# command line


def _json_arg(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _cache_arg(text: str) -> tuple[str, dict]:
    name, _, params = text.partition("=")
    if name not in dc.CACHES:
        raise argparse.ArgumentTypeError(f"unknown cache {name!r}; expected one of {sorted(dc.CACHES)}")
    return name, (_json_arg(params) if params else {})


def _csv(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv, help="comma-separated model names (default: every zoo model of --split)")
    p.add_argument("--split", choices=("tune", "heldout", "all"), default="all")
    p.add_argument("--samplers", type=_csv, help=f"comma-separated, of {sorted(SAMPLERS)} (default: every "
                   "sampler of each model's family)")
    p.add_argument("--steps", type=lambda s: [int(x) for x in _csv(s)], help="comma-separated (default 20,28,50)")
    p.add_argument("--prompts", type=int, help=f"the first N of the {len(PROMPTS)} prompts (default all)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in _csv(s)], help="comma-separated (default 0,1)")
    p.add_argument("--specdiff", type=_json_arg, action="append", metavar="JSON",
                   help="specdiff options of one method, e.g. '{\"cache_ratio\": 0.9}'; repeatable; replaces the "
                        "default specdiff settings ('{}' = the defaults)")
    p.add_argument("--cache", type=_cache_arg, action="append", metavar="NAME=JSON",
                   help="one diffusers cache setting, e.g. 'mag_cache={\"threshold\": 0.06}'; repeatable; replaces "
                        "the default cache settings")
    p.add_argument("--methods", type=_csv, help="run only these kinds (eager always runs: it is the reference), "
                   "e.g. eager,specdiff,mag_cache")
    p.add_argument("--one-prompt", action="store_true", help="run specdiff one prompt per generation, as a user "
                   "generating one image does (default: the 8 prompts of a seed as one batch, one controller "
                   "deciding for all of them)")
    p.add_argument("--speed", action="store_true", help="also time every method against eager (Inductor for specdiff)")
    p.add_argument("--speed-repeats", type=int, default=3, help="eager/method pairs per method (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine "
                   "more threads than free cores make every timing noise)")
    p.add_argument("--tiny", action="store_true", help="CI mode: one tune model (sd3), one sampler, 6 steps, "
                   "1 prompt, 1 seed, eager, bf16, specdiff defaults and one diffusers cache; the filters above still apply")
    p.add_argument("--write", action="store_true", help="write protocol.json, protocol.md and <model>.png into --out")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "protocol")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message=".*meshgrid.*")  # FasterCache's torch.meshgrid call
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # FasterCache's "experimental" warnings
    start = time.perf_counter()
    entries = [e for e in zoo_models() if a.split == "all" or e.split == a.split]
    if a.models:
        unknown = set(a.models) - {e.name for e in entries}
        if unknown:
            raise SystemExit(f"unknown model(s) {sorted(unknown)} (split {a.split}); known: {[e.name for e in entries]}")
        entries = [e for e in entries if e.name in a.models]
    elif a.tiny:
        entries = [e for e in entries if e.split == "tune" and e.family == "sd3"][:1]
    steps = a.steps or ([6] if a.tiny else list(STEPS))
    n_prompts = a.prompts or (1 if a.tiny else len(PROMPTS))
    prompts = PROMPTS[:n_prompts]
    seeds = a.seeds or ([SEEDS[0]] if a.tiny else list(SEEDS))
    if a.tiny:
        methods = default_methods(a.specdiff or [{}], a.cache or [TINY_CACHE])
    else:
        methods = default_methods(a.specdiff, a.cache)
    if a.methods:
        methods = [m for m in methods if m.kind == "eager" or m.kind in a.methods]
    if a.one_prompt:
        methods = [dataclasses.replace(m, label=f"{m.label} (one prompt per generation)", one_prompt=True)
                   if m.kind == "specdiff" else m for m in methods]
    if a.samplers:
        unknown = set(a.samplers) - set(SAMPLERS)
        if unknown:
            raise SystemExit(f"unknown sampler(s) {sorted(unknown)}; known: {sorted(SAMPLERS)}")

    log(f"{len(entries)} model(s), steps {steps}, {len(prompts)} prompt(s) x seeds {seeds}, "
        f"{len(methods)} method(s): {[m.label for m in methods]}")
    machine = machine_info()
    git = _git()  # the library the run imported: read now, not when the run ends hours later
    results: list[dict] = []
    speed: list[dict] = []
    models_meta = []
    with torch.no_grad():
        for entry in entries:
            model = specdiff_zoo.load_shapes_dit(entry.name)
            size = image_size(model)
            samplers = [s for s in SAMPLERS_BY_FAMILY[model.family] + EXTRA_SAMPLERS_BY_FAMILY[model.family]
                        if (s in a.samplers if a.samplers else s in SAMPLERS_BY_FAMILY[model.family])]
            if a.tiny and not a.samplers:
                samplers = samplers[:1]
            models_meta.append({"name": entry.name, "family": entry.family, "split": entry.split,
                                "image_size": size, "image_tokens": (size // 2) ** 2, "samplers": samplers})
            if not samplers:
                log(f"{entry.name}: no selected sampler applies to family {model.family}")
                continue
            cells = [Cell(entry.name, entry.family, entry.split, s, n) for s in samplers for n in steps]
            results += run_fidelity(entry, model, cells, methods, prompts, seeds)
            if a.speed:
                speed += run_speed(entry, model, samplers[0], methods, prompts, a.speed_repeats)
    for row in speed:
        for r in results:
            if (r["model"], r["sampler"], r["steps"], r["method"]) == (row["model"], row["sampler"], row["steps"],
                                                                         row["method"]):
                r["speedup"] = row["speedup"]
    data = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python benchmarks/protocol.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine, "git": git, "prompts": prompts, "seeds": seeds, "steps": steps,
        "images_per_cell": len(prompts) * len(seeds), "targets": TARGETS,
        "samplers": {"sd3": SD3_SCHEDULER, "flux": FLUX_SCHEDULER, "flux_guidance": FLUX_GUIDANCE,
                     "true_cfg_scale": TRUE_CFG_SCALE, "negative_prompt": NEGATIVE_PROMPT},
        "models": models_meta, "methods": [asdict(m) for m in methods], "results": results, "speed": speed,
        "summary": {"heldout": summary_rows(results, "heldout"), "tune": summary_rows(results, "tune")},
        "wall_seconds": time.perf_counter() - start,
    }
    data["machine"]["load_average_end"] = os.getloadavg()
    git_end = _git()
    if git_end != git:  # the tree moved while the run ran: its code is the start's, say what it moved to
        data["git_at_end"] = git_end
        log(f"the git tree changed during the run; recorded the start's ({git['commit'][:10]})")
    text = markdown(data) + curve_markdown(data)
    print(text, flush=True)
    if a.write:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "protocol.json").write_text(json.dumps(_plain(data), indent=1, allow_nan=False))
        (a.out / "protocol.md").write_text(text)
        for md in models_meta:
            plot_model(data, md["name"], a.out / f"{md['name']}.png")
        log(f"wrote {a.out}")
    log(f"done in {data['wall_seconds'] / 60:.1f} min")
    return data


def _plain(o: Any) -> Any:
    """``o`` as strict JSON values: NaN and infinities become ``None``, tuples lists."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if torch.is_tensor(o):
        return _plain(o.tolist())
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)


if __name__ == "__main__":
    main()
