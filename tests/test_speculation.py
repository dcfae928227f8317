"""On the trained model, the speculative pre-run changes which tokens are computed."""

import torch

import specdiff_fx
from specdiff_zoo import load_shapes_dit


def test_speculative_steps_change_the_selection():
    model = load_shapes_dit("sd3")
    prompts = ["a red circle at the left on a blue background", "a green triangle at the center on a white background"]
    counts = {}
    for steps in (0, 2):
        torch._dynamo.reset()
        opts = {"inductor": False, "speculative_steps": steps, "controller": "fixed", "warmup_steps": 2, "refresh_at": (0.6,)}
        cm = torch.compile(model.transformer, backend="specdiff", options=opts)
        with torch.no_grad():
            model.sample(prompts, num_steps=12, seed=0, transformer=cm)
        rep = specdiff_fx.last_generation()
        assert rep.count("speculative") == max(0, steps - 1)
        counts[steps] = rep.computed_counts
    assert counts[0].shape == counts[2].shape == (4, 256)
    assert not torch.equal(counts[0], counts[2])
