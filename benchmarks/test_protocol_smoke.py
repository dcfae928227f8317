"""The evaluation protocol in its tiny mode, so it cannot rot (CI runs this), and its samplers
against diffusers' own pipelines.

* ``protocol.py --tiny`` (SD3 model, ``sd3_cfg``, 6 steps, 1 prompt, 1 seed: eager, bfloat16,
  specdiff defaults, one diffusers cache), writing its files;
* one FLUX true-CFG tiny cell (8 steps, so that specdiff has cached steps): two calls per step
  inside ``cache_context("cond")`` / ``("uncond")``, with specdiff and one cache;
* each sampler equals the real ``StableDiffusion3Pipeline`` / ``FluxPipeline`` loop bit for bit
  (pipelines built around the zoo transformers, prompt embeddings and latents passed in,
  ``output_type="latent"``);
* the protocol's FLOP count equals ``FlopCounterMode``'s (``diffusers_caches.count_flops``).
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from benchmarks import protocol

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # protocol.main sets its --threads


def test_tiny_sd3_writes_every_file(tmp_path):
    data = protocol.main(["--tiny", "--write", "--out", str(tmp_path)])
    kinds = [r["kind"] for r in data["results"]]
    assert kinds == ["eager", "bf16", "specdiff", protocol.TINY_CACHE[0]]
    assert {(r["model"], r["sampler"], r["steps"], r["images"]) for r in data["results"]} == {("sd3", "sd3_cfg", 6, 1)}
    low, cache = data["results"][1], data["results"][3]
    assert 0 < cache["flops"] < 1 and cache["mean_psnr"] < protocol.PSNR_CAP  # it skipped work, and it shows
    # every token computed, in bfloat16: close to the float32 reference, not equal to it
    assert low["flops"] == 1.0 and 30 < low["mean_psnr"] < protocol.PSNR_CAP
    assert data["summary"]["tune"] and not data["summary"]["heldout"]
    assert data["summary"]["tune"][0]["bf16_mean_psnr"] == low["mean_psnr"]  # the reference next to the targets
    saved = json.loads((tmp_path / "protocol.json").read_text())
    assert saved["results"][2]["method"] == "specdiff defaults" and saved["machine"]["torch"] == torch.__version__
    md = (tmp_path / "protocol.md").read_text()
    assert "| sd3 | sd3_cfg | 6 | specdiff defaults |" in md and "No held-out model in this run." in md
    assert f"| {low['mean_psnr']:.2f} / {low['worst_psnr']:.2f} |" in md
    # the curve, and the cache against the specdiff settings at no more FLOPs (the curve target)
    assert "## Curve: `sd3`" in md and "## Against the caches: `sd3`" in md
    assert f"| {cache['method']} | {cache['mean_psnr']:.2f} |" in md
    assert (tmp_path / "sd3.png").stat().st_size > 0
    # the speed table (its run needs Inductor: a row as run_speed writes it) shows the pairs' spread
    data["speed"] = [{"model": "sd3", "sampler": "sd3_cfg", "method": "specdiff defaults", "speedup": 2.4,
                      "seconds": 0.8, "eager_seconds": 1.9, "first_seconds": 20.0,
                      "pairs": [(1.9, 0.8), (2.5, 0.8), (1.8, 0.8)]}]
    assert "| sd3 | sd3_cfg | specdiff defaults | 2.40x | 2.25-3.12x | 0.80 | 1.90 | 20.0 |" in protocol.markdown(data)


def test_one_prompt_runs_a_generation_and_a_report_per_prompt(monkeypatch):
    states = iter([{"commit": "a" * 40, "dirty": False}] + [{"commit": "b" * 40, "dirty": True}] * 3)
    monkeypatch.setattr(protocol, "_git", lambda: next(states))  # a commit lands while the run runs
    data = protocol.main(["--tiny", "--prompts", "2", "--one-prompt", "--methods", "eager,specdiff"])
    assert data["git"]["commit"] == "a" * 40 and data["git_at_end"]["commit"] == "b" * 40
    from specdiff_fx import SpecDiffConfig

    as_read = json.loads(json.dumps(data["results"][1]["config"]))
    assert as_read == json.loads(json.dumps(SpecDiffConfig().to_dict()))  # every option, as resolved
    spec = data["results"][1]
    assert spec["method"] == "specdiff defaults (one prompt per generation)" and spec["batch1"]
    assert spec["images"] == 2 and len(spec["flops_per_generation"]) == 2
    assert all(c["full"] + c["cached"] + c["skipped"] == 6 for c in spec["specdiff_calls"])  # each its own 6 steps
    assert "bf16_mean_psnr" not in data["summary"]["tune"][0]  # no bf16 run: no reference column


def test_tiny_flux_true_cfg_uses_cache_contexts():
    data = protocol.main(["--tiny", "--models", "flux", "--samplers", "flux_truecfg", "--steps", "8"])
    eager, low, spec, cache = data["results"]
    assert low["kind"] == "bf16" and 30 < low["mean_psnr"] < protocol.PSNR_CAP  # FLUX's output back in float32
    assert (spec["sampler"], spec["steps"]) == ("flux_truecfg", 8)
    calls = spec["specdiff_calls"][0]
    assert calls["branches"] == 2 and calls["cached"] > 0, calls  # cond and uncond, each with cached steps
    # the full, the sparse and the skip variant of one graph: entering cache_context did not make Dynamo
    # recompile per call
    assert calls["compiles"] <= 3, calls
    assert 0 < spec["flops"] < 1 and math.isfinite(spec["mean_psnr"])
    assert 0 < cache["flops"] < 1 and cache["mean_psnr"] < protocol.PSNR_CAP


def test_samplers_equal_the_pipelines():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

    from specdiff_zoo import load_shapes_dit, pack_pixels, unpack_pixels

    torch.set_num_threads(1)
    prompts, steps = protocol.PROMPTS[:2], 4
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd3 = load_shapes_dit("sd3")
        size = protocol.image_size(sd3)
        noise = protocol.initial_noise(0, size, len(prompts))
        hidden, pooled = sd3.encode(prompts)
        neg_hidden, neg_pooled = sd3.encode([protocol.NEGATIVE_PROMPT] * len(prompts))
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**protocol.SD3_SCHEDULER), vae=None, text_encoder=None,
            tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
            transformer=sd3.transformer)
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(prompt_embeds=hidden, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_hidden,
                       negative_pooled_prompt_embeds=neg_pooled, guidance_scale=sd3.config["default_guidance_scale"],
                       num_inference_steps=steps, latents=noise, output_type="latent").images
        assert torch.equal(protocol.sample_sd3_cfg(sd3, sd3.transformer, prompts, noise, steps),
                           latents.float().clamp(-1, 1))

        flux = load_shapes_dit("flux")
        size = protocol.image_size(flux)
        noise = protocol.initial_noise(0, size, len(prompts))
        hidden, pooled = flux.encode(prompts)
        neg_hidden, neg_pooled = flux.encode([protocol.NEGATIVE_PROMPT] * len(prompts))
        for sampler, extra in (("flux_truecfg", {"negative_prompt_embeds": neg_hidden,
                                                 "negative_pooled_prompt_embeds": neg_pooled,
                                                 "true_cfg_scale": protocol.TRUE_CFG_SCALE}),
                               ("flux_nocfg", {})):
            pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**protocol.FLUX_SCHEDULER), vae=None,
                                text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                transformer=flux.transformer)
            pipe.set_progress_bar_config(disable=True)
            # without a VAE the pipeline assumes 8x latents: size * 8 pixels = size / 2 tokens a side, as packed here
            latents = pipe(prompt_embeds=hidden, pooled_prompt_embeds=pooled, guidance_scale=protocol.FLUX_GUIDANCE,
                           num_inference_steps=steps, latents=pack_pixels(noise), height=size * 8, width=size * 8,
                           output_type="latent", **extra).images
            mine = protocol.SAMPLERS[sampler](flux, flux.transformer, prompts, noise, steps)
            assert torch.equal(mine, unpack_pixels(latents, size, size).float().clamp(-1, 1)), sampler


@pytest.mark.parametrize("family, sampler", [("sd3", "sd3_cfg"), ("flux", "flux_truecfg")])
def test_flop_count_equals_flop_counter_mode(family, sampler):
    from benchmarks import diffusers_caches as dc
    from specdiff_zoo import load_shapes_dit

    torch.set_num_threads(1)
    model = load_shapes_dit(family)
    noise = protocol.initial_noise(0, protocol.image_size(model), 1)
    runner = dc.cached_sampler(model, *protocol.TINY_CACHE, num_steps=4, auto_reset=False)
    try:
        with torch.no_grad():
            def generate():
                runner.reset()
                return protocol.SAMPLERS[sampler](model, runner, protocol.PROMPTS[:1], noise, 4)

            mine, counted = protocol.count_flops(generate)
            theirs, reference = dc.count_flops(generate)
    finally:
        runner.remove()
    assert counted == reference > 0 and torch.equal(mine, theirs)


def test_registry_and_held_out_summary(monkeypatch):
    """With ``specdiff_zoo.MODELS`` the protocol lists the registry's models and splits; the
    summary judges the specdiff defaults on held-out cells only (synthetic results, no model)."""
    from types import SimpleNamespace

    import specdiff_zoo

    zoo = {n: SimpleNamespace(name=n, family=f, split=s) for n, f, s in
           [("sd3", "sd3", "tune"), ("sd3_b", "sd3", "heldout"), ("flux_64", "flux", "heldout")]}
    monkeypatch.setattr(specdiff_zoo, "MODELS", zoo, raising=False)
    assert [(e.name, e.split) for e in protocol.zoo_models()] == [("sd3", "tune"), ("sd3_b", "heldout"),
                                                                   ("flux_64", "heldout")]

    def row(model, split, params, psnrs, flops):
        return {"model": model, "split": split, "sampler": "s", "steps": 28, "kind": "specdiff", "params": params,
                "psnr": psnrs, "mean_psnr": sum(psnrs) / len(psnrs), "worst_psnr": min(psnrs), "flops": flops}

    results = [row("sd3", "tune", {}, [40.0, 40.0], 0.2), row("sd3_b", "heldout", {}, [33.0, 31.0], 0.30),
               row("flux_64", "heldout", {}, [29.0, 24.0], 0.34), row("sd3_b", "heldout", {"cache_ratio": 0.5},
                                                                      [50.0, 50.0], 0.6)]
    summary = protocol.summary_rows(results, "heldout")
    assert [r["cell"].split(" / ")[0] for r in summary[:2]] == ["sd3_b", "flux_64"]
    overall = summary[-1]
    assert overall["mean_psnr"] == pytest.approx(29.25) and overall["worst_psnr"] == 24.0 and overall["flops"] == 0.34
    assert overall["meets"] == {"mean_psnr": False, "worst_psnr": False, "flops": True}
    assert summary[0]["meets"] == {"mean_psnr": True, "worst_psnr": True, "flops": True}


def test_tiny_sd3_skip_layer_guidance_counts_both_graphs():
    """``sd3_slg`` only when asked for: a second graph (``skip_layers``) on the skip-layer steps;
    each batch's FLOPs count both graphs' calls, and the main run stays one generation."""
    data = protocol.main(["--tiny", "--models", "sd3", "--samplers", "sd3_slg", "--steps", "12",
                          "--methods", "eager,specdiff"])
    eager, spec = data["results"]
    assert (spec["sampler"], spec["steps"]) == ("sd3_slg", 12)
    main, skipped = spec["specdiff_calls"]  # 0.12 < i < 2.4: steps 1 and 2 call the model twice
    assert main["full"] + main["cached"] + main["skipped"] == 12 and main["cached"] > 0
    assert skipped["full"] + skipped["cached"] + skipped["skipped"] == 2
    assert 0 < spec["flops"] < 1
    assert protocol.slg_layers(24) == [7, 8, 9] and protocol.slg_layers(4) == [1]
    assert "sd3_slg" not in protocol.SAMPLERS_BY_FAMILY["sd3"]  # not a cell of the default protocol


def test_tiny_flux_true_cfg_rescaled_per_token_stays_one_generation():
    """``flux_truecfg_renorm`` (Qwen-Image's true CFG: the guided velocity rescaled per token) on
    the trained FLUX model: routing explains the update token by token, so the batch is one
    generation of two branches that caches, not a new generation per step."""
    data = protocol.main(["--tiny", "--models", "flux", "--samplers", "flux_truecfg_renorm", "--steps", "8",
                          "--methods", "eager,specdiff"])
    eager, spec = data["results"]
    assert (spec["sampler"], spec["steps"]) == ("flux_truecfg_renorm", 8)
    (calls,) = spec["specdiff_calls"]
    assert calls["branches"] == 2 and calls["full"] + calls["cached"] + calls["skipped"] == 16
    assert calls["cached"] > 0 and spec["flops"] < 1


@pytest.mark.parametrize("sampler, kind", [("sd3_heun", "heun"), ("sd3_unipc", "unipc")])
def test_swapped_sd3_schedulers_equal_the_pipeline_and_cache(sampler, kind):
    """``sd3_heun`` / ``sd3_unipc`` only when asked for: the SD3 pipeline with its scheduler swapped
    gives the sampler's latents; under specdiff the batch caches (Heun: ``2n - 1`` calls)."""
    from diffusers import StableDiffusion3Pipeline

    from specdiff_zoo import load_shapes_dit

    torch.set_num_threads(1)
    prompts, steps = protocol.PROMPTS[:2], 4
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd3 = load_shapes_dit("sd3")
        noise = protocol.initial_noise(0, protocol.image_size(sd3), len(prompts))
        hidden, pooled = sd3.encode(prompts)
        neg_hidden, neg_pooled = sd3.encode([protocol.NEGATIVE_PROMPT] * len(prompts))
        pipe = StableDiffusion3Pipeline(
            scheduler=protocol.sd3_scheduler(kind), vae=None, text_encoder=None, tokenizer=None,
            text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None, transformer=sd3.transformer)
        pipe.set_progress_bar_config(disable=True)
        latents = pipe(prompt_embeds=hidden, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg_hidden,
                       negative_pooled_prompt_embeds=neg_pooled, guidance_scale=sd3.config["default_guidance_scale"],
                       num_inference_steps=steps, latents=noise, output_type="latent").images
        assert torch.equal(protocol.SAMPLERS[sampler](sd3, sd3.transformer, prompts, noise, steps),
                           latents.float().clamp(-1, 1))
    data = protocol.main(["--tiny", "--models", "sd3", "--samplers", sampler, "--steps", "10",
                          "--methods", "eager,specdiff"])
    _, spec = data["results"]
    (main,) = spec["specdiff_calls"]
    assert main["full"] + main["cached"] + main["skipped"] == (19 if kind == "heun" else 10)
    assert main["cached"] > 0 and 0 < spec["flops"] < 1
    assert sampler not in protocol.SAMPLERS_BY_FAMILY["sd3"]


def test_default_methods_measure_the_speculative_run():
    """The protocol's default specdiff settings include the speculative pre-run the library's
    defaults do not run (a setting equal to the defaults would measure them twice)."""
    from specdiff_fx.config import SpecDiffConfig

    spec = [p["speculative_steps"] for p in protocol.DEFAULT_SPECDIFF if "speculative_steps" in p]
    assert spec and all(s != SpecDiffConfig().speculative_steps for s in spec)
