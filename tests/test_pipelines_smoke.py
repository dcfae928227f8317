"""Smoke tests for the tiny offline SD3 / FLUX pipelines of :mod:`pipelines`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from pipelines import (
    CLIP_MAX_LENGTH,
    WORDS,
    flux_call_kwargs,
    image_token_count,
    sd3_call_kwargs,
    text_token_count,
    tiny_clip_tokenizer,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_t5_tokenizer,
)

STEPS = 6

Pipe = StableDiffusion3Pipeline | FluxPipeline


@pytest.fixture(scope="module")
def sd3() -> StableDiffusion3Pipeline:
    return tiny_sd3_pipeline(0)


@pytest.fixture(scope="module")
def flux() -> FluxPipeline:
    return tiny_flux_pipeline(0)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe_and_kwargs(request, sd3, flux) -> tuple[Pipe, Callable[..., dict[str, Any]]]:
    return (sd3, sd3_call_kwargs) if request.param == "sd3" else (flux, flux_call_kwargs)


@contextmanager
def record_transformer_calls(pipe: Pipe) -> Iterator[list[dict[str, Any]]]:
    """Record the keyword arguments of every transformer call made inside the block."""
    calls: list[dict[str, Any]] = []

    def hook(module, args, kwargs, output):
        calls.append(dict(kwargs))

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def run(pipe: Pipe, kwargs: dict[str, Any]) -> torch.Tensor:
    return pipe(**kwargs).images


def check_images(images: torch.Tensor, batch: int, height: int, width: int) -> None:
    assert images.shape == (batch, 3, height, width)
    assert torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert images.std() > 1e-3  # not a constant image


# --------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------


def test_components_eval_float32(sd3, flux) -> None:
    for pipe in (sd3, flux):
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                assert not component.training, name
                assert all(p.dtype == torch.float32 for p in component.parameters()), name


def test_same_seed_same_weights_and_rng_untouched() -> None:
    state = torch.random.get_rng_state()
    a, b, c = tiny_flux_pipeline(0), tiny_flux_pipeline(0), tiny_flux_pipeline(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        wa, wb, wc = (dict(p.components[name].named_parameters()) for p in (a, b, c))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
        assert any(not torch.equal(wa[k], wc[k]) for k in wa), name


def test_tokenizers() -> None:
    clip = tiny_clip_tokenizer()
    for word in WORDS:
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
    batch = clip(["a red cat", "??"], padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True)
    ids = torch.tensor(batch.input_ids)
    assert ids.shape == (2, CLIP_MAX_LENGTH)
    words = clip("a red cat", add_special_tokens=False).input_ids
    assert ids[0, :5].tolist() == [clip.bos_token_id, *words, clip.eos_token_id]
    assert ids[0, 5:].eq(clip.pad_token_id).all()
    decoded = clip.batch_decode(clip(["a photo of a red cat"], add_special_tokens=False).input_ids)
    assert decoded == ["a photo of a red cat"]

    t5 = tiny_t5_tokenizer()
    ids = t5(["a red cat", "zebra"], padding="max_length", max_length=8, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 8)
    assert ids[0, :4].tolist()[-1] == t5.eos_token_id and ids[0, 4:].eq(t5.pad_token_id).all()
    assert t5.unk_token_id not in ids[1].tolist()  # unknown words fall back to characters
    assert t5.batch_decode(t5(["a photo of a red cat"]).input_ids, skip_special_tokens=True) == ["a photo of a red cat"]


# --------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------


def test_sd3_cfg_batched(sd3) -> None:
    kwargs = sd3_call_kwargs(0, guidance_scale=5.0)
    with record_transformer_calls(sd3) as calls:
        images = run(sd3, kwargs)
    check_images(images, 1, 32, 32)
    assert len(calls) == STEPS  # one batched [uncond, cond] call per step
    text = text_token_count(sd3, 16)
    assert text == CLIP_MAX_LENGTH + 16
    for call in calls:
        assert call["hidden_states"].shape == (2, 4, 16, 16)
        assert call["encoder_hidden_states"].shape == (2, text, 32)
        assert call["pooled_projections"].shape == (2, 32)
    uncond, cond = calls[0]["encoder_hidden_states"]
    assert not torch.equal(uncond, cond)
    assert image_token_count(sd3, 32, 32) == (16 // 2) ** 2


def test_flux_guidance_embedding(flux) -> None:
    with record_transformer_calls(flux) as calls:
        images = run(flux, flux_call_kwargs(0, guidance_scale=3.5))
    check_images(images, 1, 32, 32)
    assert len(calls) == STEPS
    tokens = image_token_count(flux, 32, 32)
    assert tokens == 64
    for call in calls:
        assert call["hidden_states"].shape == (1, tokens, 16)
        assert call["img_ids"].shape == (tokens, 3)
        assert call["encoder_hidden_states"].shape == (1, text_token_count(flux, 16), 32)
        assert call["pooled_projections"].shape == (1, 32)
        assert torch.equal(call["guidance"], torch.tensor([3.5]))
    other = run(flux, flux_call_kwargs(0, guidance_scale=1.0))
    assert not torch.equal(images, other)  # the embedded guidance reaches the output


def test_flux_true_cfg_two_calls_per_step(flux) -> None:
    kwargs = flux_call_kwargs(0, true_cfg_scale=2.0, negative_prompt="blurry low quality")
    with record_transformer_calls(flux) as calls:
        images = run(flux, kwargs)
    check_images(images, 1, 32, 32)
    assert len(calls) == 2 * STEPS
    for cond, uncond in zip(calls[0::2], calls[1::2]):
        assert cond["hidden_states"].shape[0] == uncond["hidden_states"].shape[0] == 1  # separate, unbatched
        assert torch.equal(cond["hidden_states"], uncond["hidden_states"])
        assert torch.equal(cond["timestep"], uncond["timestep"])
        assert not torch.equal(cond["encoder_hidden_states"], uncond["encoder_hidden_states"])
    assert not torch.equal(images, run(flux, flux_call_kwargs(0)))


def test_same_seed_same_output_other_seed_differs(pipe_and_kwargs) -> None:
    pipe, make_kwargs = pipe_and_kwargs
    first = run(pipe, make_kwargs(0))
    assert torch.equal(first, run(pipe, make_kwargs(0)))
    assert not torch.allclose(first, run(pipe, make_kwargs(1)))


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_fresh_pipeline_reproduces_output(kind: str) -> None:
    build, make_kwargs = {
        "sd3": (tiny_sd3_pipeline, sd3_call_kwargs),
        "flux": (tiny_flux_pipeline, flux_call_kwargs),
    }[kind]
    kwargs = dict(num_inference_steps=2, output_type="latent")
    assert torch.equal(run(build(0), make_kwargs(3, **kwargs)), run(build(0), make_kwargs(3, **kwargs)))


def test_non_square(pipe_and_kwargs) -> None:
    pipe, make_kwargs = pipe_and_kwargs
    with record_transformer_calls(pipe) as calls:
        images = run(pipe, make_kwargs(0, height=32, width=64))
    check_images(images, 1, 32, 64)
    tokens = image_token_count(pipe, 32, 64)
    assert tokens == 128
    seen = calls[0]["hidden_states"]
    if isinstance(pipe, FluxPipeline):
        assert seen.shape[1] == tokens
    else:
        assert seen.shape[-2:] == (16, 32) and (seen.shape[-2] // 2) * (seen.shape[-1] // 2) == tokens


def test_latent_output(sd3, flux) -> None:
    sd3_latents = run(sd3, sd3_call_kwargs(0, height=32, width=64, num_inference_steps=2, output_type="latent"))
    assert sd3_latents.shape == (1, 4, 16, 32) and torch.isfinite(sd3_latents).all()
    flux_latents = run(flux, flux_call_kwargs(0, height=32, width=64, num_inference_steps=2, output_type="latent"))
    assert flux_latents.shape == (1, 128, 16) and torch.isfinite(flux_latents).all()


def test_batched_and_truncated_prompts(sd3, flux) -> None:
    long_prompt = " ".join(WORDS)  # longer than both CLIP_MAX_LENGTH and max_sequence_length
    prompts = ["a photo of a red cat", long_prompt]
    images = run(sd3, sd3_call_kwargs(0, prompt=prompts, num_inference_steps=2))
    check_images(images, 2, 32, 32)
    images = run(flux, flux_call_kwargs(0, prompt=prompts, num_inference_steps=2))
    check_images(images, 2, 32, 32)
