"""The defaults' rule (benchmarks/choose_defaults.py) on hand-made protocol files."""

import json

import pytest

from benchmarks import choose_defaults


def _run(tmp_path, name, params, seeds, cells, split="tune"):
    """A protocol.json with one specdiff method; ``cells``: {(model, sampler, steps): (psnr per
    image over the seeds, FLOPs share)}."""
    results = []
    for (model, sampler, steps), (psnr, flops) in cells.items():
        results.append({"model": model, "sampler": sampler, "steps": steps, "split": split, "kind": "eager",
                        "params": {}, "psnr": [float("inf")] * len(psnr), "flops": 1.0})
        results.append({"model": model, "sampler": sampler, "steps": steps, "split": split, "kind": "specdiff",
                        "params": params, "psnr": psnr, "flops": flops,
                        "flops_per_generation": [flops] * len(seeds), "batch1": False})
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"seeds": seeds, "results": results, "git": {"commit": "abc", "dirty": False}}))
    return path


CELL_A, CELL_B = ("sd3", "sd3_cfg", 20), ("flux", "flux_nocfg", 28)


def test_fewest_flops_among_passing(tmp_path):
    cur = _run(tmp_path, "cur", {}, [0], {CELL_A: ([40, 30], 0.40), CELL_B: ([38, 26], 0.35)})
    loose = _run(tmp_path, "loose", {"tolerance": 0.3}, [0], {CELL_A: ([35, 26], 0.30), CELL_B: ([35, 25.5], 0.28)})
    looser = _run(tmp_path, "looser", {"tolerance": 0.5}, [0], {CELL_A: ([36, 24], 0.2), CELL_B: ([33, 27], 0.2)})
    chosen, verdicts = choose_defaults.choose(choose_defaults.load([cur, loose, looser]), "{}")
    assert chosen == json.dumps({"tolerance": 0.3})
    assert verdicts[json.dumps({"tolerance": 0.5})]["fails"] == ["sd3 sd3_cfg 20: an image at 24.00 dB"]
    assert choose_defaults.main([str(cur), str(loose), str(looser)]) == {"tolerance": 0.3}


def test_an_image_under_the_line_counts_only_where_the_defaults_kept_it(tmp_path):
    cur = _run(tmp_path, "cur", {}, [0], {CELL_A: ([40, 24], 0.40)})
    cand = _run(tmp_path, "cand", {"tolerance": 0.3}, [0], {CELL_A: ([38, 23], 0.30)})
    low_mean = _run(tmp_path, "low", {"tolerance": 0.4}, [0], {CELL_A: ([30, 29], 0.20)})
    chosen, verdicts = choose_defaults.choose(choose_defaults.load([cur, cand, low_mean]), "{}")
    assert chosen == json.dumps({"tolerance": 0.3})
    assert verdicts[json.dumps({"tolerance": 0.4})]["fails"] == ["sd3 sd3_cfg 20: mean 29.50 dB"]


def test_a_candidate_that_lifts_an_image_over_the_line_comes_before_fewer_flops(tmp_path):
    cur = _run(tmp_path, "cur", {}, [0], {CELL_A: ([40, 24], 0.30), CELL_B: ([38, 27], 0.30)})
    cheaper = _run(tmp_path, "cheap", {"tolerance": 0.3}, [0], {CELL_A: ([39, 24.5], 0.25), CELL_B: ([37, 26], 0.25)})
    lifts = _run(tmp_path, "lifts", {"reuse_extrapolation": 0.25}, [0],
                 {CELL_A: ([41, 25.5], 0.31), CELL_B: ([38, 27], 0.31)})
    chosen, verdicts = choose_defaults.choose(choose_defaults.load([cur, cheaper, lifts]), "{}")
    assert chosen == json.dumps({"reuse_extrapolation": 0.25})
    assert [verdicts[k]["cells_below_floor"] for k in ("{}", json.dumps({"tolerance": 0.3}),
                                                        json.dumps({"reuse_extrapolation": 0.25}))] == [1, 1, 0]
    # without the candidate that lifts it, the fewest FLOPs decide as before
    assert choose_defaults.choose(choose_defaults.load([cur, cheaper]), "{}")[0] == json.dumps({"tolerance": 0.3})


def test_a_costlier_candidate_wins_only_above_the_exchange_rate(tmp_path):
    cur = _run(tmp_path, "cur", {}, [0], {CELL_A: ([36, 30], 0.30), CELL_B: ([36, 30], 0.30)})
    # +2 dB mean of cells for +0.5 points: 4 dB per point, above the rate (3): it wins
    above = _run(tmp_path, "above", {"reuse_extrapolation": 0.25}, [0],
                 {CELL_A: ([38, 32], 0.305), CELL_B: ([38, 32], 0.305)})
    # +3 dB for +2 points (1.5 dB per point, what the knob trades): the cheaper one stays
    knob = _run(tmp_path, "knob", {"tolerance": 0.13}, [0], {CELL_A: ([39, 33], 0.32), CELL_B: ([39, 33], 0.32)})
    # above the rate on the mean, but its worst image falls: not preferred
    lower = _run(tmp_path, "lower", {"reuse_extrapolation": 1.0}, [0],
                 {CELL_A: ([42, 29], 0.305), CELL_B: ([42, 29], 0.305)})
    # a tiny gain at nearly the same FLOPs (above the rate, under the minimum gain): not preferred
    tiny = _run(tmp_path, "tiny", {"sparse_calls": 2}, [0], {CELL_A: ([36.4, 30], 0.3001), CELL_B: ([36.4, 30], 0.3001)})
    key = json.dumps({"reuse_extrapolation": 0.25})
    load = choose_defaults.load
    assert choose_defaults.choose(load([cur, above]), "{}")[0] == key
    assert choose_defaults.choose(load([cur, knob]), "{}")[0] == "{}"
    assert choose_defaults.choose(load([cur, lower]), "{}")[0] == "{}"
    assert choose_defaults.choose(load([cur, tiny]), "{}")[0] == "{}"
    # the scan goes up in FLOPs from the choice so far: the knob's point is judged against `above`
    assert choose_defaults.choose(load([cur, above, knob, lower, tiny]), "{}")[0] == key
    # once it is the default, the rule keeps it against plain reuse
    assert choose_defaults.choose(load([cur, above]), key)[0] == key
    # a higher rate asked for: the cheapest passing candidate again
    assert choose_defaults.choose(load([cur, above]), "{}", exchange=5.0)[0] == "{}"
    assert choose_defaults.main([str(cur), str(above), "--exchange", "5"]) == {}


def test_a_bf16_reference_lowers_its_cells_floors(tmp_path):
    cur = _run(tmp_path, "cur", {}, [0], {CELL_A: ([40, 24], 0.30), CELL_B: ([38, 27], 0.30)})
    cheaper = _run(tmp_path, "cheap", {"tolerance": 0.3}, [0], {CELL_A: ([39, 22], 0.25), CELL_B: ([29.5, 27], 0.25)})
    lifts = _run(tmp_path, "lifts", {"tolerance": 0.05}, [0], {CELL_A: ([41, 25.5], 0.5), CELL_B: ([38, 27], 0.5)})
    bf16 = tmp_path / "bf16.json"  # full compute in bfloat16 on both cells: CELL_A forks an image, CELL_B a mean
    bf16.write_text(json.dumps({"seeds": [0], "results": [
        {"model": m, "sampler": s, "steps": n, "split": "tune", "kind": "bf16", "params": {}, "psnr": p, "flops": 1.0}
        for (m, s, n), p in ((CELL_A, [35, 21.5]), (CELL_B, [29.0, 31.0]))]}))
    paths = [cur, cheaper, lifts, bf16]
    floors = choose_defaults.reference_floors(paths)
    assert floors == {CELL_A: (28.25, 21.5), CELL_B: (30.0, 25.0)}
    assert choose_defaults.choose(choose_defaults.load(paths), "{}")[0] == json.dumps({"tolerance": 0.05})
    chosen, verdicts = choose_defaults.choose(choose_defaults.load(paths), "{}", floors=floors)
    # CELL_A's images are all over bf16's worst (21.5): no candidate is below its floor, the fewest FLOPs win;
    # CELL_B's mean floor stays 30 (bf16's mean is 30.0): the cheaper candidate's 28.25 fails it
    assert chosen == "{}" and [verdicts[k]["cells_below_floor"] for k in verdicts] == [0, 0, 0]
    assert verdicts[json.dumps({"tolerance": 0.3})]["fails"] == ["flux flux_nocfg 28: mean 28.25 dB"]
    assert choose_defaults.main([str(p) for p in paths]) == {}


def test_more_seeds_add_up_and_a_candidate_must_cover_them(tmp_path):
    cur01 = _run(tmp_path, "c01", {"tolerance": 0.16}, [0, 1], {CELL_A: ([40, 30, 41, 31], 0.40)})
    cur23 = _run(tmp_path, "c23", {}, [2, 3], {CELL_A: ([40, 28, 39, 29], 0.40)})
    cand01 = _run(tmp_path, "n01", {"tolerance": 0.18}, [0, 1], {CELL_A: ([39, 29, 40, 30], 0.30)})
    runs = choose_defaults.load([cur01, cur23, cand01])
    assert set(runs) == {"{}", json.dumps({"tolerance": 0.18})}  # 0.16 is the library's default: the same key
    assert choose_defaults._normalise({"refresh_at": [0.45, 0.7], "inductor": False, "sparse_calls": 2}) == \
        json.dumps({"sparse_calls": 2})  # a tuple default read back from JSON is a list
    assert len(runs["{}"]) == 4 and runs["{}"][("sd3", "sd3_cfg", 20, 3)]["psnr"] == [39, 29]
    chosen, verdicts = choose_defaults.choose(runs, "{}")
    assert chosen == "{}" and not verdicts[json.dumps({"tolerance": 0.18})]["complete"]
    cand23 = _run(tmp_path, "n23", {"tolerance": 0.18}, [2, 3], {CELL_A: ([39, 24.9, 40, 30], 0.30)})
    chosen, verdicts = choose_defaults.choose(choose_defaults.load([cur01, cur23, cand01, cand23]), "{}")
    assert chosen == "{}"  # seed 2 loses an image the defaults keep
    assert verdicts[json.dumps({"tolerance": 0.18})]["fails"] == ["sd3 sd3_cfg 20: an image at 24.90 dB"]


def test_a_run_before_a_default_changed_keeps_the_options_it_ran_with(tmp_path):
    from specdiff_fx import SpecDiffConfig

    old = _run(tmp_path, "old", {}, [0], {CELL_A: ([40, 30], 0.40)})
    data = json.loads(old.read_text())
    for r in data["results"]:  # run when the defaults had another tolerance
        r["config"] = SpecDiffConfig(tolerance=0.2).to_dict() if r["kind"] == "specdiff" else None
    old.write_text(json.dumps(data))
    new = _run(tmp_path, "new", {}, [0], {CELL_A: ([41, 31], 0.45)})
    assert set(choose_defaults.load([old, new])) == {"{}", json.dumps({"tolerance": 0.2})}


def test_held_out_runs_and_double_counts_are_refused(tmp_path):
    held = _run(tmp_path, "held", {}, [0], {CELL_A: ([40, 30], 0.40)}, split="heldout")
    with pytest.raises(SystemExit, match="tune runs only"):
        choose_defaults.load([held])
    cur = _run(tmp_path, "cur", {}, [0], {CELL_A: ([40, 30], 0.40)})
    with pytest.raises(SystemExit, match="measured twice"):
        choose_defaults.load([cur, cur])
