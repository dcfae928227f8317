"""CI smoke test: compile_time runs both settings cold in their own processes (side by side:
``--cold-jobs 2``), on a tiny config, and the two settings' images agree; its side-by-side rounds in this process run too (as plain FX
here: the cold runs already compile every variant with Inductor twice, the costliest test of the
suite, and the rounds would compile them twice more)."""

from benchmarks import compile_time


def test_both_settings_run_and_agree():
    out = compile_time.main(["--config", "tiny", "--steps", "3", "--rounds", "0", "--cold-jobs", "2"])
    assert set(out["first"]) == set(compile_time.SETTINGS)
    assert all(f["compiles"] >= 2 and f["compile_s"] > 0 for f in out["first"].values())
    assert out["latent_diff"] < 1e-3
    assert out["steady"] == {name: [] for name in (*compile_time.SETTINGS, compile_time.EAGER)}


def test_side_by_side_rounds_time_every_setting_and_eager():
    times = compile_time.steady("tiny", None, steps=2, rounds=2, options={"inductor": False})
    assert set(times) == {*compile_time.SETTINGS, compile_time.EAGER}
    assert all(len(t) == 2 and all(x > 0 for x in t) for t in times.values())


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
