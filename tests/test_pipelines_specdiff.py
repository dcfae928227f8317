"""specdiff inside real diffusers pipelines built from tiny local components (no downloads):
StableDiffusion3Pipeline (batched CFG), FluxPipeline (guidance embedding) and FluxPipeline
with true CFG (cond and uncond as two calls per step)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import specdiff_fx
from pipelines import flux_call_kwargs, image_token_count, sd3_call_kwargs, tiny_flux_pipeline, tiny_sd3_pipeline

CASES = {
    "sd3": (tiny_sd3_pipeline, lambda **kw: sd3_call_kwargs(**kw), 2),  # batch 2: uncond + cond
    "flux": (tiny_flux_pipeline, lambda **kw: flux_call_kwargs(**kw), 1),
    "flux_true_cfg": (tiny_flux_pipeline,
                      lambda **kw: flux_call_kwargs(negative_prompt="blurry", true_cfg_scale=2.0, **kw), 1),
}


def run_pipe(name, compile_options=None, **call):
    make_pipe, kwargs, _ = CASES[name]
    pipe = make_pipe()
    if compile_options is not None:
        torch._dynamo.reset()
        pipe.transformer = torch.compile(pipe.transformer, backend="specdiff", options=compile_options)
    return pipe(**kwargs(**call)).images


@pytest.mark.parametrize("name", list(CASES))
def test_cache_ratio_zero_equals_eager(name):
    ref = run_pipe(name, num_inference_steps=8)
    out = run_pipe(name, {"cache_ratio": 0.0, "inductor": False}, num_inference_steps=8)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert specdiff_fx.last_record().status == "plain"


@pytest.mark.parametrize("name", list(CASES))
def test_default_options_cache_tokens(name):
    steps, height, width = 14, 32, 64
    make_pipe, _, batch = CASES[name]
    images = run_pipe(name, {"inductor": False}, num_inference_steps=steps, height=height, width=width)
    assert images.shape == (1, 3, height, width) and torch.isfinite(images).all()
    rep = specdiff_fx.last_generation()
    n = image_token_count(make_pipe(), height, width)
    cfg = specdiff_fx.SpecDiffConfig()
    k = round((1 - cfg.cache_ratio) * n)
    branches = 2 if name == "flux_true_cfg" else 1
    assert rep.num_image_tokens == n and rep.batch == batch
    assert rep.count("speculative") == (cfg.speculative_steps - 1) * branches
    assert len(rep.main_steps) == steps * branches
    full = [s.step for s in rep.steps if s.kind == "full" and s.branch == 0]
    assert full[: cfg.warmup_steps] == list(range(cfg.warmup_steps)) and len(full) == cfg.warmup_steps + 2
    cached = [s for s in rep.steps if s.kind == "cached"]
    assert len(cached) == (steps - len(full)) * branches
    assert all(s.c1 == (k,) * batch for s in cached)
    assert rep.flops_fraction < 1.0


@pytest.mark.inductor
def test_default_options_with_inductor_sd3():
    """The real configuration: both variants compiled by Inductor inside the pipeline."""
    ref = run_pipe("sd3", num_inference_steps=12)
    out = run_pipe("sd3", {}, num_inference_steps=12)
    rep = specdiff_fx.last_generation()
    assert rep.count("cached") > 0 and rep.compiles == 2
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert (out - ref).abs().max() < 0.25  # cached, not identical; close on a random tiny model
    plain = run_pipe("sd3", {"inductor": False}, num_inference_steps=12)
    torch.testing.assert_close(out, plain, atol=2e-3, rtol=1e-3)  # Inductor == FX rewrite


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from pipelines import {make}, {kwargs}
    pipe = {make}()
    pipe.transformer = torch.compile(pipe.transformer, backend="specdiff", options={{"inductor": False}})
    if {both}:
        pipe(**{kwargs}(seed=1, height=32, width=32, num_inference_steps=10))
    out = pipe(**{kwargs}(seed=2, height=32, width=64, num_inference_steps=12)).images
    torch.save(out, {path!r})
    """
)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_no_state_leaks_between_generations(tmp_path, name):
    make = "tiny_sd3_pipeline" if name == "sd3" else "tiny_flux_pipeline"
    kwargs = "sd3_call_kwargs" if name == "sd3" else "flux_call_kwargs"
    outs = []
    for both in (True, False):  # back to back vs. the second generation alone, each in a fresh process
        path = str(tmp_path / f"{both}.pt")
        script = SCRIPT.format(tests=os.path.dirname(__file__), make=make, kwargs=kwargs, both=both, path=path)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs.append(torch.load(path))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
