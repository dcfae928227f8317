"""Smoke test of benchmarks/diffusers_caches.py: every cache kind of SWEEP applies to the SD3
zoo model, runs a short generation that differs from full compute, resets to a reproducible
state and comes off cleanly (8 steps, 1 prompt; well under a minute on two CPU cores)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import diffusers_caches as dc  # noqa: E402
from specdiff_zoo import ShapesModel, load_shapes_dit  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")  # FasterCache

STEPS = 8
PROMPTS = ["a red circle at the left on a blue background"]
#: the last SWEEP setting of every cache kind (chosen so that 8 steps already skip work)
KINDS: dict[str, dict] = {name: params for name, params in dc.SWEEP}


@pytest.fixture(scope="module")
def model() -> Iterator[ShapesModel]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: one thread is as fast and far less disturbed by other load
    try:
        yield load_shapes_dit("sd3")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(model: ShapesModel) -> tuple[torch.Tensor, int]:
    """Full-compute images and FLOPs."""
    return dc.count_flops(lambda: model.sample(PROMPTS, num_steps=STEPS))


@pytest.fixture(scope="module")
def one_call(model: ShapesModel) -> tuple[dict, torch.Tensor]:
    """Keyword inputs of one transformer call and its full-compute output."""
    hidden, pooled = model.encode(PROMPTS * 2)
    gen = torch.Generator().manual_seed(1)
    kwargs = {"hidden_states": torch.randn(2, 3, 32, 32, generator=gen), "encoder_hidden_states": hidden,
              "pooled_projections": pooled, "timestep": torch.full((2,), 500.0), "return_dict": False}
    with torch.no_grad():
        return kwargs, model.transformer(**kwargs)[0]


def test_sweep_covers_every_cache() -> None:
    assert set(KINDS) == set(dc.CACHES)
    assert all(isinstance(why, str) and why for why in dc.NOT_APPLICABLE.values())


@pytest.mark.parametrize("name", sorted(KINDS))
def test_cache_applies_runs_resets_and_removes(model: ShapesModel, reference: tuple[torch.Tensor, int],
                                               one_call: tuple[dict, torch.Tensor], name: str) -> None:
    images, full_flops = reference
    sampler = dc.cached_sampler(model, name, KINDS[name], num_steps=STEPS, auto_reset=False)
    try:
        assert sampler.handle.hooks, f"{name} installed no hooks"
        first, flops = dc.count_flops(lambda: model.sample(PROMPTS, num_steps=STEPS, transformer=sampler))
        sampler.reset()
        second = model.sample(PROMPTS, num_steps=STEPS, transformer=sampler)
        with pytest.raises(RuntimeError, match="still applied"):
            dc.apply_cache(model.transformer, name, **KINDS[name])
    finally:
        sampler.remove()
    assert torch.isfinite(first).all()
    assert not torch.equal(first, images), f"{name} changed nothing"
    assert torch.equal(first, second), f"{name}: state leaked through reset()"
    assert flops < full_flops, f"{name} computed as much as full compute"
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks
               for m in model.transformer.modules()), f"{name} left hooks behind"
    kwargs, expected = one_call
    with torch.no_grad():  # no cache context: a left-over TaylorSeer/FBC hook would raise here
        assert torch.equal(model.transformer(**kwargs)[0], expected), f"{name}: model not eager after remove()"


def test_new_generation_resets_automatically(model: ShapesModel) -> None:
    """TaylorSeer's step counter leaks into the next generation unless reset; the sampler
    resets by itself when the timestep jumps back up."""
    sampler = dc.cached_sampler(model, "taylorseer", KINDS["taylorseer"], num_steps=STEPS)
    try:
        first = model.sample(PROMPTS, num_steps=STEPS, transformer=sampler)
        second = model.sample(PROMPTS, num_steps=STEPS, transformer=sampler)
    finally:
        sampler.remove()
    assert torch.equal(first, second)


#: FLUX settings that skip work within 6 calls (timesteps 1000 ... 250 on the 1000 scale)
FLUX_CONTEXT_KINDS: dict[str, dict] = {
    "taylorseer": {"cache_interval": 2, "disable_cache_before_step": 2},
    "first_block_cache": {"threshold": 2.0},
    "mag_cache": {"threshold": 0.5, "max_skip_steps": 3, "retention_ratio": 0.2, "mag_ratios": [1.0] * 6,
                  "num_inference_steps": 6},
    "faster_cache": {"is_guidance_distilled": True, "spatial_attention_timestep_skip_range": (-1, 801)},
    "pyramid_attention_broadcast": {"spatial_attention_block_skip_range": 2,
                                    "spatial_attention_timestep_skip_range": (-1, 801)},
}


@pytest.mark.parametrize("name", sorted(FLUX_CONTEXT_KINDS))
def test_cache_contexts_keep_separate_state(name: str) -> None:
    """FLUX true CFG: a "cond" call and an "uncond" call per step, each in its cache context.
    The "cond" outputs must not depend on whether "uncond" calls run in between: every cache
    keeps one state per context (stock PAB and FasterCache share theirs; the handle splits it)."""
    from specdiff_zoo import pack_pixels, pixel_ids

    assert set(FLUX_CONTEXT_KINDS) == set(dc.CACHES)
    model = load_shapes_dit("flux")
    hidden, pooled = model.encode(PROMPTS)
    neg_hidden, neg_pooled = model.encode([""])
    gen = torch.Generator().manual_seed(0)
    latents = [pack_pixels(torch.randn(1, 3, 32, 32, generator=gen)) for _ in range(6)]
    sigmas = torch.linspace(1.0, 0.25, 6)
    common = {"txt_ids": torch.zeros(hidden.shape[1], 3), "img_ids": pixel_ids(32, 32),
              "guidance": torch.full((1,), 3.5), "return_dict": False}
    with torch.no_grad():
        full = [model.transformer(hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled,
                                  timestep=s.reshape(1), **common)[0] for x, s in zip(latents, sigmas)]
    runner = dc.cached_sampler(model, name, FLUX_CONTEXT_KINDS[name], num_steps=6, auto_reset=False)
    assert runner.timestep_scale == 1.0  # FLUX gets sigma; PAB/FasterCache still see 1000-scale timesteps
    streams = []
    try:
        with torch.no_grad():
            for interleave in (False, True):
                runner.reset()
                cond = []
                for x, s in zip(latents, sigmas):
                    with runner.cache_context("cond"):
                        cond.append(runner(hidden_states=x, encoder_hidden_states=hidden, pooled_projections=pooled,
                                           timestep=s.reshape(1), **common)[0])
                    if interleave:
                        with runner.cache_context("uncond"):
                            runner(hidden_states=x, encoder_hidden_states=neg_hidden, pooled_projections=neg_pooled,
                                   timestep=s.reshape(1), **common)
                streams.append(cond)
    finally:
        runner.remove()
    alone, interleaved = streams
    assert any(not torch.equal(a, f) for a, f in zip(alone, full)), f"{name} skipped nothing"
    assert all(torch.equal(a, b) for a, b in zip(alone, interleaved)), f"{name}: uncond calls changed the cond stream"
