"""True CFG with the uncond call through a second graph: linked branches against one graph.

    python benchmarks/two_graphs.py                          # flux, 20/28/50 steps, seeds 0-1 (4 min)
    python benchmarks/two_graphs.py --negative-tokens 6 --no-link

The protocol's ``flux_truecfg_renorm`` sampler (Qwen-Image's true CFG: cond, then uncond, the
guided velocity rescaled per token to the cond output's norm) on a zoo FLUX model, with the
uncond call made a graph of its own, as a negative prompt of another token length than the
prompt's makes it in ``QwenImagePipeline``:

* ``--negative-tokens 0`` (default): the same text, its ``txt_ids`` passed as float64 (FLUX casts
  them to float32 before use): the same arithmetic as one graph, another graph to Dynamo, so the
  images must equal the one-graph protocol cell's whenever the two runtimes decide as one;
* ``--negative-tokens N``: the negative prompt's embedding cut to its first ``N`` tokens
  (another problem: the eager reference changes with it).

Per cell: mean / worst-image PSNR against eager of the same sampler over 8 prompts x the seeds,
the FLOPs of both graphs' calls against computing all of them, and each graph's calls per
generation. ``--no-link`` turns off the link between the two runtimes' branches (each decides
alone; routing still follows both through the companion outputs).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

from benchmarks import protocol  # noqa: E402


def sample(model: Any, transformer: Callable[..., Any], prompts: Sequence[str], noise: torch.Tensor, steps: int,
           negative_tokens: int = 0) -> torch.Tensor:
    """``protocol.sample_flux_truecfg_renorm`` with the uncond call through another graph (above)."""
    size, b = noise.shape[-1], len(prompts)
    latents = protocol.pack_pixels(noise.to(model.device, model.dtype))
    scheduler, timesteps = protocol.flux_timesteps(steps, latents.shape[1], model.device)
    hidden, pooled = model.encode(list(prompts))
    neg_hidden, neg_pooled = model.encode([protocol.NEGATIVE_PROMPT] * b)
    txt_ids = torch.zeros(hidden.shape[1], 3, device=model.device, dtype=model.dtype)
    if negative_tokens:
        neg_hidden = neg_hidden[:, :negative_tokens]
        neg_ids = torch.zeros(negative_tokens, 3, device=model.device, dtype=model.dtype)
    else:
        neg_ids = txt_ids.to(torch.float64)
    guidance = torch.full([1], protocol.FLUX_GUIDANCE, device=model.device, dtype=torch.float32).expand(b)
    img_ids = protocol.pixel_ids(size, size, device=model.device).to(model.dtype)
    for t in timesteps:
        timestep = t.expand(b).to(latents.dtype)
        common = dict(hidden_states=latents, timestep=timestep / 1000, guidance=guidance, img_ids=img_ids,
                      joint_attention_kwargs={}, return_dict=False)
        cond = transformer(pooled_projections=pooled, encoder_hidden_states=hidden, txt_ids=txt_ids, **common)[0]
        uncond = transformer(pooled_projections=neg_pooled, encoder_hidden_states=neg_hidden, txt_ids=neg_ids,
                             **common)[0]
        velocity = protocol.guide("flux_truecfg_renorm", model, [cond, uncond])
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return protocol.unpack_pixels(latents, size, size).float().clamp(-1, 1)


@contextlib.contextmanager
def unlinked():
    """Runtimes that never link branches across graphs (what ``--no-link`` measures)."""
    from specdiff_fx.runtime.core import SpecDiffRuntime

    saved = SpecDiffRuntime._link
    SpecDiffRuntime._link = lambda self, *args: None
    try:
        yield
    finally:
        SpecDiffRuntime._link = saved


def measure(name: str, steps: int, seeds: Sequence[int], prompts: int = 8, negative_tokens: int = 0,
            link: bool = True, options: dict | None = None) -> dict:
    """One cell: PSNR per image against eager, FLOPs, and each graph's calls per generation."""
    import specdiff_fx
    import specdiff_zoo

    model = specdiff_zoo.load_shapes_dit(name)
    size = protocol.image_size(model)
    texts = protocol.PROMPTS[:prompts]
    psnr, flops, calls = [], [], []
    with torch.no_grad(), (contextlib.nullcontext() if link else unlinked()):
        for seed in seeds:
            noise = protocol.initial_noise(seed, size, len(texts))
            ref = sample(model, model.transformer, texts, noise, steps, negative_tokens)
            torch._dynamo.reset()
            specdiff_fx.reset()
            compiled = torch.compile(model.transformer, backend="specdiff", options={"inductor": False, **(options or {})})
            with specdiff_fx.track() as tracked:
                out = sample(model, compiled, texts, noise, steps, negative_tokens)
            psnr += protocol._per_image(out, ref)[0]
            flops.append(protocol.flops_fraction(tracked.reports))
            calls.append([len(r.main_steps) for r in tracked.reports])
    return {"model": name, "steps": steps, "mean_psnr": sum(psnr) / len(psnr), "worst_psnr": min(psnr),
            "flops": sum(flops) / len(flops), "calls": calls}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flux")
    p.add_argument("--steps", default="20,28,50")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--negative-tokens", type=int, default=0)
    p.add_argument("--no-link", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    print("| model | steps | negative tokens | link | mean / worst PSNR | FLOPs | calls per generation |")
    print("|---|---|---|---|---|---|---|")
    for steps in (int(s) for s in a.steps.split(",")):
        row = measure(a.model, steps, [int(s) for s in a.seeds.split(",")], a.prompts, a.negative_tokens,
                      link=not a.no_link)
        rows.append(row)
        print(f"| {a.model} | {steps} | {a.negative_tokens or 'all (float64 ids)'} | {'no' if a.no_link else 'yes'} "
              f"| {row['mean_psnr']:.2f} / {row['worst_psnr']:.2f} dB | {row['flops']:.1%} | {row['calls'][0]} |",
              flush=True)
    return rows


if __name__ == "__main__":
    main()
