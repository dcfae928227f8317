"""Tests for the shapes model zoo (:mod:`specdiff_zoo`): data, registry, loaders, sample quality, training CLI."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from specdiff_zoo import (
    FAMILIES,
    MODELS,
    WEIGHTS_DIR,
    ShapesModel,
    ZooModel,
    build_transformer,
    default_transformer_config,
    load_shapes_dit,
    models,
    pack_pixels,
    pixel_ids,
    shape_colour_check,
    to_uint8,
    unpack_pixels,
)
from specdiff_zoo.data import (
    MAX_LEN,
    PAD_ID,
    SHAPE_COLOURS,
    VOCAB,
    colour_report,
    description_from_caption,
    make_dataset,
    nearest_colour,
    render,
    tokenize,
)
from specdiff_zoo.text import ShapesTextEncoder, TextEncoderConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
QUALITY_PROMPTS = 12
QUALITY_STEPS = 10


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any accidental hub access fail instead of reaching the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest) -> ShapesModel:
    """Each registered zoo model, loaded once per module."""
    return load_shapes_dit(request.param)


def _pass_rate(m: ShapesModel, seed: int = 123) -> float:
    """Colour-check pass rate of single-shape prompts (two-shape binding is much weaker at this size)."""
    _, captions, descs = make_dataset(QUALITY_PROMPTS, seed=seed, p_two=0.0, image_size=m.image_size)
    images = m.sample(captions, num_steps=QUALITY_STEPS, seed=seed)
    return float(np.mean([shape_colour_check(img, d) for img, d in zip(images, descs)]))


# --- data -----------------------------------------------------------------------------------------


def test_tokenize_fixed_length_and_null_caption() -> None:
    ids = tokenize("a red circle at the left on a navy background")
    assert ids.dtype == torch.long and ids.shape == (MAX_LEN,)
    assert VOCAB[int(ids[1])] == "red" and int(ids[-1]) == PAD_ID
    assert torch.equal(tokenize(""), torch.full((MAX_LEN,), PAD_ID))
    assert int(tokenize("zebra")[0]) == VOCAB.index("<unk>")


def test_dataset_deterministic_per_seed() -> None:
    a, ca, da = make_dataset(16, seed=7)
    b, cb, db = make_dataset(16, seed=7)
    c, cc, _ = make_dataset(16, seed=8)
    assert torch.equal(a, b) and ca == cb and da == db
    assert not torch.equal(a, c) or ca != cc
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert float(a.min()) >= -1.0 and float(a.max()) <= 1.0


# sha256 of make_dataset(8, seed)[0].numpy().tobytes(), computed with the 32-px-only generator
# before the dataset took an image_size: 32-px images must stay bit-identical.
PINNED_32PX_SHA256 = {
    0: "044e58bb8967fc0e6c3df6c83447143c9cd7d43eaf3a04bae15cc95c5660b0fc",
    1: "2fe0223379acc17c69e7221cea771e6839ce501444b1ca9ea46fcb4cdc6873ec",
    7: "2cf6fd11e2af53d6a36238fbb677ba02bdb696faf4351ddd4e05a7a9b17d78ff",
}


@pytest.mark.parametrize("seed", sorted(PINNED_32PX_SHA256))
def test_dataset_32px_pinned(seed: int) -> None:
    images, _, descs = make_dataset(8, seed=seed)
    assert hashlib.sha256(images.numpy().tobytes()).hexdigest() == PINNED_32PX_SHA256[seed]
    assert all("image_size" not in d for d in descs)
    assert torch.equal(make_dataset(8, seed=seed, image_size=32)[0], images)


def test_captions_match_drawings() -> None:
    images, captions, descs = make_dataset(200, seed=1)
    for img, cap, desc in zip(images, captions, descs):
        assert all(len(tok) for tok in cap.split()) and len(cap.split()) <= MAX_LEN
        assert int((tokenize(cap) == VOCAB.index("<unk>")).sum()) == 0
        parsed = description_from_caption(cap)
        assert parsed["background"] == desc["background"]
        for s, p in zip(desc["shapes"], parsed["shapes"]):
            assert (s["shape"], s["colour"], s["position"]) == (p["shape"], p["colour"], p["position"])
            # The pixel at the shape centre has exactly the caption colour.
            rgb = (img[:, int(s["row"]), int(s["col"])] + 1) / 2
            assert torch.allclose(rgb, torch.tensor(SHAPE_COLOURS[s["colour"]]), atol=1e-6)
            assert nearest_colour(rgb) == s["colour"]
        assert shape_colour_check(img, desc)
        assert shape_colour_check(img, parsed)


def test_check_rejects_wrong_caption() -> None:
    images, _, descs = make_dataset(50, seed=2)
    wrong = 0
    for img, desc in zip(images, descs):
        bad = json.loads(json.dumps(desc))
        s = bad["shapes"][0]
        s["colour"] = next(c for c in SHAPE_COLOURS if c != s["colour"])
        wrong += shape_colour_check(img, bad)
    assert wrong == 0


def test_dataset_64px_renders_the_32px_scene() -> None:
    images, captions, descs = make_dataset(64, seed=3, image_size=64)
    small, small_captions, small_descs = make_dataset(64, seed=3)
    assert images.shape == (64, 3, 64, 64) and images.dtype == torch.float32
    assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
    assert captions == small_captions  # same draws, same scenes
    for img, cap, desc, sdesc in zip(images, captions, descs, small_descs):
        assert desc["image_size"] == 64 and torch.equal(render(desc), img)
        for s, t in zip(desc["shapes"], sdesc["shapes"]):
            assert (s["colour"], s["position"]) == (t["colour"], t["position"])
            assert s["row"] == pytest.approx(2 * t["row"]) and s["half"] == pytest.approx(2 * t["half"])
            rgb = (img[:, int(s["row"]), int(s["col"])] + 1) / 2
            assert torch.allclose(rgb, torch.tensor(SHAPE_COLOURS[s["colour"]]), atol=1e-6)
        assert shape_colour_check(img, desc)
        assert shape_colour_check(img, description_from_caption(cap, image_size=64))
    # Downsampled 2x, a 64-px image is close to the 32-px rendering of the same seed (edges differ).
    assert float((torch.nn.functional.avg_pool2d(images, 2) - small).abs().mean()) < 0.03


def test_colour_check_needs_matching_sizes() -> None:
    images, _, descs = make_dataset(2, seed=4, image_size=64)
    with pytest.raises(ValueError, match="description is for 64 px"):
        colour_report(torch.nn.functional.avg_pool2d(images, 2)[0], descs[0])
    with pytest.raises(ValueError, match="multiple of 32"):
        make_dataset(1, seed=0, image_size=48)


@pytest.mark.parametrize("size", [32, 64])
def test_pack_unpack_roundtrip(size: int) -> None:
    x = torch.randn(2, 3, size, size)
    tokens = pack_pixels(x)
    n = (size // 2) ** 2
    assert tokens.shape == (2, n, 12)
    assert torch.equal(unpack_pixels(tokens, size, size), x)
    ids = pixel_ids(size, size)
    assert ids.shape == (n, 3) and int(ids[:, 1].max()) == size // 2 - 1


# --- registry -------------------------------------------------------------------------------------


def test_registry_contents_and_splits() -> None:
    assert set(MODELS) >= {"sd3", "flux"}
    assert all(name == m.name for name, m in MODELS.items())
    assert [(m.name, m.family, m.image_size, m.weights) for m in models(split="tune")] == [
        ("sd3", "sd3", 32, "shapes_sd3"),
        ("flux", "flux", 32, "shapes_flux"),
        ("flux_64t", "flux", 64, "shapes_flux_64t"),
        ("flux_64s", "flux", 64, "shapes_flux_64s"),
        ("sd3_t", "sd3", 32, "shapes_sd3_t"),
    ]
    assert models() == list(MODELS.values())
    assert models(split="tune") + models(split="heldout") == sorted(
        models(), key=lambda m: m.split != "tune"
    )
    assert all(m.family == "flux" for m in models(family="flux"))
    for m in models():
        assert m.family in FAMILIES and m.split in ("tune", "heldout") and m.description
        assert m.has_weights(), f"{m.name} is registered without weights"
        meta = json.loads(m.paths()[0].read_text())
        assert (meta["family"], meta.get("image_size", 32)) == (m.family, m.image_size)
    with pytest.raises(ValueError, match="split"):
        models(split="train")
    with pytest.raises(ValueError, match="family"):
        models(family="dit")
    with pytest.raises(ValueError, match="split"):
        ZooModel("x", "sd3", "test", 32, "shapes_x", "bad split")


def test_heldout_models_differ_from_tune_models() -> None:
    held = models(split="heldout")
    assert {m.name for m in held} == {"sd3_b", "flux_64"}
    assert {m.family for m in held} == set(FAMILIES)
    assert max(m.num_image_tokens for m in held) >= 1024
    tune = [json.loads(m.paths()[0].read_text()) for m in models(split="tune")]
    for m in held:
        meta = json.loads(m.paths()[0].read_text())
        for ref in (t for t in tune if t["family"] == m.family):  # every tune model of the family
            assert meta["transformer"] != ref["transformer"], m.name  # another architecture or size
            assert meta["train"]["seed"] not in (ref["train"]["seed"], (ref["train"].get("previous_stage") or {})
                                                 .get("seed")), m.name
            assert meta["train"]["steps"] != ref["train"]["steps"], m.name
        assert meta["train"]["command"].startswith("python scripts/train_shapes.py"), m.name
        assert meta["train"]["image_size"] == m.image_size


def test_default_config_unchanged_for_tune_models() -> None:
    for name in ("sd3", "flux"):  # the 32 px tune models; flux_64t continues flux, flux_64s and sd3_t are their own
        meta = json.loads(MODELS[name].paths()[0].read_text())
        assert default_transformer_config(MODELS[name].family) == meta["transformer"]
    s = json.loads(MODELS["flux_64s"].paths()[0].read_text())["transformer"]
    assert s == {**default_transformer_config("flux", image_size=64), "num_single_layers": 3}
    t = json.loads(MODELS["sd3_t"].paths()[0].read_text())["transformer"]
    assert t == default_transformer_config("sd3", num_layers=5, heads=4, head_dim=24)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown zoo model 'nope'.*sd3, flux"):
        load_shapes_dit("nope")
    with pytest.raises(FileNotFoundError, match="shapes_nope.json"):
        load_shapes_dit("nope", weights_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="shapes_sd3.json"):
        load_shapes_dit("sd3", weights_dir=tmp_path)


# --- loaders --------------------------------------------------------------------------------------


def test_weights_files_present_and_small() -> None:
    for m in models():
        meta_path, st = m.paths()
        assert st.parent == WEIGHTS_DIR and st.stat().st_size <= 15 * 2**20
        assert (WEIGHTS_DIR / f"{m.weights}_loss.csv").is_file()
        meta = json.loads(meta_path.read_text())
        assert meta["vocab"] == list(VOCAB)
        assert {"transformer", "text_encoder", "timestep_convention", "train"} <= set(meta)
        assert meta["train"]["steps"] > 100 and np.isfinite(meta["train"]["final_loss"])
        assert not meta["train"]["quick"]


def test_loader_outputs(model: ShapesModel) -> None:
    entry = MODELS[model.name]
    assert (model.family, model.image_size) == (entry.family, entry.image_size)
    assert model.num_image_tokens == entry.num_image_tokens
    assert not model.transformer.training and not model.text_encoder.training
    prompts = ["a red circle at the left on a navy background", ""]
    hidden, pooled = model.encode(prompts)
    assert hidden.shape == (2, MAX_LEN, model.config["transformer"]["joint_attention_dim"])
    assert pooled.shape == (2, model.config["transformer"]["pooled_projection_dim"])
    assert hidden.dtype == pooled.dtype == torch.float32
    assert torch.isfinite(hidden).all() and torch.isfinite(pooled).all()
    images = model.sample(prompts, num_steps=2, seed=0)
    size = model.image_size
    assert images.shape == (2, 3, size, size) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and float(images.abs().max()) <= 1.0
    u8 = to_uint8(images)
    assert u8.shape == (2, size, size, 3) and u8.dtype == torch.uint8


def test_sample_deterministic_and_custom_transformer(model: ShapesModel) -> None:
    calls: list[int] = []

    def wrapped(**kwargs: object) -> object:
        calls.append(1)
        return model.transformer(**kwargs)

    prompts = ["a blue square at the top on a white background"]
    ref = model.sample(prompts, num_steps=3, seed=5)
    out = model.sample(prompts, num_steps=3, seed=5, transformer=wrapped)
    assert len(calls) == 3  # one transformer call per step (SD3 batches cond + uncond)
    assert torch.equal(ref, out)


def test_load_dtype() -> None:
    m = load_shapes_dit("sd3", dtype=torch.bfloat16)
    assert next(m.transformer.parameters()).dtype == torch.bfloat16
    hidden, pooled = m.encode(["a red circle at the left on a navy background"])
    assert hidden.dtype == pooled.dtype == torch.bfloat16


# --- quality --------------------------------------------------------------------------------------


def test_trained_samples_pass_colour_check(model: ShapesModel) -> None:
    if not MODELS[model.name].follows_prompts:  # the registry says so; its training check agrees
        assert model.config["quality_check"]["pass_rate"] < 0.7
        return
    assert _pass_rate(model) >= 0.7


@pytest.mark.parametrize("family", FAMILIES)
def test_random_weights_fail_colour_check(family: str) -> None:
    torch.manual_seed(0)
    trained = load_shapes_dit(family)
    te = ShapesTextEncoder(TextEncoderConfig(**trained.config["text_encoder"])).eval()
    rand = ShapesModel(
        family=family,
        transformer=build_transformer(family, trained.config["transformer"]).eval(),
        text_encoder=te,
        config=trained.config,
    )
    assert _pass_rate(rand) <= 0.3


# --- training CLI ---------------------------------------------------------------------------------


def _train_in_process(*argv: str) -> None:
    """``scripts/train_shapes.py`` with ``argv``, run in this process: a subprocess per run
    would add ~8 s of imports; the CLI as its own process runs in
    test_quick_training_named_64px. Restores what ``train`` sets globally (thread count,
    torch's RNG)."""
    spec = importlib.util.spec_from_file_location("train_shapes", REPO_ROOT / "scripts" / "train_shapes.py")
    train_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_shapes)
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            train_shapes.main(list(argv))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_quick_training_runs(family: str, tmp_path: Path) -> None:
    _train_in_process("--family", family, "--quick", "--out", str(tmp_path))
    m = load_shapes_dit(family, weights_dir=tmp_path)
    assert m.config["train"]["quick"] and m.config["train"]["steps"] == 3
    rows = (tmp_path / f"shapes_{family}_loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and len(rows) == 4


def test_quick_training_named_64px(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "train_shapes.py"), "--family", "flux", "--quick",
           "--name", "x", "--image-size", "64", "--num-layers", "1", "--num-single-layers", "1", "--heads", "2",
           "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes_x.json", "shapes_x.safetensors",
                                                           "shapes_x_loss.csv"]
    m = load_shapes_dit("x", weights_dir=tmp_path)
    assert (m.name, m.family, m.image_size, m.num_image_tokens) == ("x", "flux", 64, 1024)
    tcfg = m.config["transformer"]
    assert (tcfg["num_layers"], tcfg["num_single_layers"], tcfg["num_attention_heads"]) == (1, 1, 2)
    assert m.config["train"]["command"].endswith("--out " + str(tmp_path))
    assert m.config["architecture_overrides"]["heads"] == 2
    images = m.sample(["a red circle at the left on a navy background"], num_steps=2, seed=0)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_init_continues_flux_at_a_new_size_and_refuses_sd3(tmp_path: Path) -> None:
    script = ["--quick", "--num-layers", "1", "--out", str(tmp_path)]
    flux = ["--family", "flux", "--name", "f", "--num-single-layers", "1"]
    _train_in_process(*script, *flux)
    init = str(tmp_path / "shapes_f.safetensors")
    _train_in_process(*script, *flux, "--image-size", "64", "--seed", "1", "--init", init)
    m = load_shapes_dit("f", weights_dir=tmp_path)
    train = m.config["train"]
    assert m.image_size == 64 and train["image_size"] == 64 and train["previous_stage"]["image_size"] == 32
    assert train["total_steps"] == 6 and train["init_from"] == "shapes_f.safetensors"
    rows = (tmp_path / "shapes_f_loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(6)]
    sd3 = ["--family", "sd3", "--name", "s"]
    _train_in_process(*script, *sd3)
    with pytest.raises(SystemExit, match="transformer config"):
        _train_in_process(*script, *sd3, "--image-size", "64", "--init", str(tmp_path / "shapes_s.safetensors"))
