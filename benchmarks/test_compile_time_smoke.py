"""CI smoke test: compile_time runs both settings cold in their own processes and side by side
in this one, on a tiny config; the two settings' images agree."""

from benchmarks import compile_time


def test_both_settings_run_and_agree():
    out = compile_time.main(["--config", "tiny", "--steps", "3", "--rounds", "1"])
    assert set(out["first"]) == set(compile_time.SETTINGS)
    assert all(f["compiles"] >= 2 and f["compile_s"] > 0 for f in out["first"].values())
    assert out["latent_diff"] < 1e-3
    assert all(len(t) == 1 for t in out["steady"].values())


def test_a_zoo_model_generates_as_the_protocol_samples():
    """``--model NAME``: the zoo model's transformer and the protocol's generation (8 prompts,
    seed 0), run here with the eager transformer."""
    import torch

    from benchmarks.time_breakdown import generation_setup

    model, generate = compile_time.workload("mid", "sd3", steps=2)
    *_, noise = generation_setup("sd3", 8)
    with torch.no_grad():
        x = generate(model)
    assert x.shape == noise.shape and torch.isfinite(x).all()


def test_the_flux_depth_config_builds_and_generates():
    """``--config flux_deep``: gpu_latency's tiny FLUX with FLUX.1-dev's 19 + 38 blocks, and its
    generation (run here with the eager transformer, 2 steps)."""
    import torch

    model, generate = compile_time.workload("flux_deep", None, steps=2)
    assert len(model.transformer_blocks) == 19 and len(model.single_transformer_blocks) == 38
    with torch.no_grad():
        assert torch.isfinite(generate(model)).all()
