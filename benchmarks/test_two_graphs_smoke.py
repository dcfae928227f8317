"""CI smoke test: true CFG with the uncond call through a second graph (``two_graphs.py``) stays
one generation per graph, and linked it decides as one graph does: the same arithmetic, so the
same images as the protocol's one-graph sampler (unlinked they differ)."""

import torch

from benchmarks import protocol, two_graphs


def test_linked_graphs_give_the_one_graph_images():
    import specdiff_fx
    import specdiff_zoo

    model = specdiff_zoo.load_shapes_dit("flux")
    noise = protocol.initial_noise(0, protocol.image_size(model), 2)
    prompts = protocol.PROMPTS[:2]
    with torch.no_grad():
        eager_two = two_graphs.sample(model, model.transformer, prompts, noise, 8)
        eager_one = protocol.sample_flux_truecfg_renorm(model, model.transformer, prompts, noise, 8)
        torch.testing.assert_close(eager_two, eager_one)  # float64 ids: the same arithmetic
        images = {}
        for name, run in (("one", protocol.sample_flux_truecfg_renorm), ("two", two_graphs.sample)):
            torch._dynamo.reset()
            compiled = torch.compile(model.transformer, backend="specdiff", options={"inductor": False})
            with specdiff_fx.track() as tracked:
                images[name] = run(model, compiled, prompts, noise, 8)
            assert [len(r.main_steps) for r in tracked.reports] == ([16] if name == "one" else [8, 8])
    torch.testing.assert_close(images["two"], images["one"])
    row = two_graphs.measure("flux", 8, [0], prompts=2, link=False)
    assert row["calls"] == [[8, 8]] and row["worst_psnr"] < 100


def test_main_prints_a_row():
    (row,) = two_graphs.main(["--steps", "6", "--seeds", "0", "--prompts", "1", "--negative-tokens", "4"])
    # another text length: Dynamo's first graph serves the first call, then a dynamic one takes over
    (calls,) = row["calls"]
    assert sum(calls) == 12 and len(calls) <= 3 and 0 < row["flops"] <= 1
