"""specdiff under diffusers' context parallelism (Ulysses), two gloo processes on CPU.

One spawn runs every scenario (each spawn pays process start-up and imports again; the
scenarios' own time is mostly Dynamo tracing and variant building, ~90 s in all); the
tests below assert on its results. Scenarios, each on both ranks:

* the pass: ``collapse_ulysses`` on the real Dynamo graph of tiny FLUX under CP — structure
  (no exchange left, one ``ulysses_attention`` per attention, a top-level gather) and
  numerics (the collapsed graph computes what Dynamo's does); the analysis of it;
* exactness: ``cache_ratio=0`` and a default-options first (full) call against
  single-process eager, on tiny FLUX and tiny FLUX.2;
* a generation at the defaults on the trained FLUX model, sampled as ``FluxPipeline``
  samples (the benchmark's worker, ``benchmarks/context_parallel.py``, untimed): caching on
  every rank with the same decisions, as close to full compute as the same generation on
  one process, each rank at half the FLOPs of one process;
* lockstep: one rank that must compute every token (its memory cap) makes both do so;
* tiny FLUX.2 in a loop: caches on both ranks with the same decisions.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import context_parallel as cp_bench
from benchmarks.context_parallel import enable_context_parallel, spawn

WORLD = 2
STEPS = 16


def _kinds(report) -> str:
    return "".join(s.kind[0] for s in report.main_steps)


def _loop(fn, inputs: dict, steps: int, on_step=None) -> torch.Tensor:
    """A shift-3 Euler loop (timestep = sigma, FLUX convention); ``on_step(i)`` before step ``i``."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    sigmas = 3.0 * t / (1 + 2.0 * t)
    x = inputs["hidden_states"].clone()
    with torch.no_grad():
        for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            if on_step is not None:
                on_step(i)
            v = fn(**{**inputs, "hidden_states": x, "timestep": torch.full_like(inputs["timestep"], float(s))},
                   return_dict=False)[0]
            x = x + (s_next - s) * v
    return x


def _graph_scenario(model, inputs) -> dict:
    import sys

    import specdiff_fx.passes  # noqa: F401
    from specdiff_fx import analyze_dit, ops

    from conftest import capture

    cu = sys.modules["specdiff_fx.passes.collapse_ulysses"]
    gm, ex = capture(model, {**inputs, "return_dict": False})  # the gather hook wants the tuple output
    new = cu.collapse_ulysses(gm)
    kinds = [cu._kind(n) for n in gm.graph.nodes]
    targets = [n.target for n in new.graph.nodes]
    gathers = [n for n in new.graph.nodes if n.target is ops.gather_shards]
    with torch.no_grad():
        before, after = gm(*ex)[0], new(*ex)[0]
    plan = analyze_dit(new)
    return {
        "sdpa_before": kinds.count("sdpa"), "a2a_before": kinds.count("a2a"),
        "ulysses_after": targets.count(ops.ulysses_attention),
        "exchanges_after": sum(cu._kind(n) in ("a2a", "wait", "gather") for n in new.graph.nodes),
        "gather_after": len(gathers), "gather_top_level": all(not n.meta.get("nn_module_stack") for n in gathers),
        "parallel": new.meta.get("specdiff_parallel"), "collapsed_diff": float((before - after).abs().max()),
        "plan_tokens": plan.num_image_tokens, "plan_parallel": plan.parallel, "plan_attention": len(plan.attention),
        "untouched": cu.collapse_ulysses(new) is new,
    }


def _variant_scenario(model, inputs) -> dict:
    """The full and sparse variants of the collapsed graph, built and run directly: their
    structure, cache shapes, and a sparse call that computes every token (``k = N``, the
    caches from the full call, extrapolation ratio 0) against the full call."""
    from specdiff_fx import SpecDiffConfig, analyze_dit, ops
    from specdiff_fx.passes import collapse_ulysses
    from specdiff_fx.signature import ContextMode, Port, Role, VariantKey, kv_ports
    from specdiff_fx.variants import build_variant

    from conftest import capture

    gm, ex = capture(model, {**inputs, "return_dict": False})
    gm = collapse_ulysses(gm)
    plan = analyze_dit(gm)
    cfg = SpecDiffConfig(inductor=False, kv_dtype="model")  # caches as computed: the comparisons are exact
    attn, n, batch = len(plan.attention), plan.num_image_tokens, plan.batch

    def count(v, target) -> int:
        return sum(node.target is target for node in v.gm.graph.nodes)

    full = build_variant(gm, ex, plan, cfg, VariantKey.full(refresh_text=True))
    user, extras = full.run(ex, {})
    out = {"attention": attn, "full_kv_ops": count(full, ops.ulysses_attention_kv),
           "full_plain_ops": count(full, ops.ulysses_attention),
           "kv_shape": tuple(extras[Port(Role.KV, 0, "k")].shape), "q_shape": None, "sparse": {}}
    kv = [extras[p] for p in kv_ports(Role.KV, attn)]
    text = [extras.get(p) for p in kv_ports(Role.TEXT_KV, attn)]
    for context in (ContextMode.COMPUTE, ContextMode.CACHED, ContextMode.REFRESH):
        v = build_variant(gm, ex, plan, cfg, VariantKey.sparse(n, context, extrapolate=True))
        caches = [t.clone() for t in kv]
        prev = [t.clone() for t in kv]
        values = {Port(Role.IDX): torch.arange(n).expand(batch, n).contiguous(),
                  Port(Role.HISTORY): torch.zeros(cfg.history_depth, batch, n, plan.out_channels),
                  Port(Role.WEIGHTS): torch.zeros(batch, n, cfg.history_depth),
                  Port(Role.KV_RATIO): torch.zeros(batch, n),
                  **dict(zip(kv_ports(Role.KV, attn), caches)), **dict(zip(kv_ports(Role.KV_PREV, attn), prev))}
        if context is ContextMode.CACHED:
            values.update({p: t for p, t in zip(kv_ports(Role.TEXT_KV, attn), text) if t is not None})
            values.update({p: t for p, t in zip(kv_ports(Role.TEXT_KV_PREV, attn), text) if t is not None})
            values[Port(Role.TEXT_RATIO)] = torch.zeros(batch)
        got, got_extras = v.run(ex, values)
        shapes = {i.port.key: i.shape for i in v.new_inputs}
        fresh_text = [got_extras.get(p) for p in kv_ports(Role.TEXT_KV, attn)]
        out["sparse"][context.value] = {
            "cached_ops": count(v, ops.ulysses_attend_cached), "plain_ops": count(v, ops.ulysses_attention),
            "global_index": count(v, ops.global_index), "k0_shape": shapes["k0"],
            "text_shape": shapes.get("kt0"),
            "diff": float((got[0] - user[0]).abs().max()),
            "caches_diff": max(float((a - b).abs().max()) for a, b in zip(caches, kv)),
            "prev_diff": max(float((a - b).abs().max()) for a, b in zip(prev, kv)),
            "text_diff": max((float((a - b).abs().max()) for a, b in zip(fresh_text, text) if a is not None),
                             default=None),
        }
    # bfloat16 caches (kv_dtype): the full variant returns its exchanged K/V rounded; a sparse call
    # computing every token reads and writes them and still equals the full call
    narrow = cfg.replace(kv_dtype="bfloat16")
    full_b = build_variant(gm, ex, plan, narrow, VariantKey.full(refresh_text=True))
    _, extras_b = full_b.run(ex, {})
    kv_b = [extras_b[p] for p in kv_ports(Role.KV, attn)]
    text_b = [extras_b[p] for p in kv_ports(Role.TEXT_KV, attn) if p in extras_b]
    v = build_variant(gm, ex, plan, narrow, VariantKey.sparse(n, ContextMode.COMPUTE, extrapolate=True))
    caches, prev = [t.clone() for t in kv_b], [t.clone() for t in kv_b]
    values = {Port(Role.IDX): torch.arange(n).expand(batch, n).contiguous(),
              Port(Role.HISTORY): torch.zeros(cfg.history_depth, batch, n, plan.out_channels),
              Port(Role.WEIGHTS): torch.zeros(batch, n, cfg.history_depth),
              Port(Role.KV_RATIO): torch.zeros(batch, n),
              **dict(zip(kv_ports(Role.KV, attn), caches)), **dict(zip(kv_ports(Role.KV_PREV, attn), prev))}
    got, _ = v.run(ex, values)
    out["bf16"] = {
        "returned": sorted({str(t.dtype) for t in kv_b + text_b}), "texts": len(text_b),
        "inputs": sorted({str(i.dtype) for i in v.new_inputs if i.port.role in (Role.KV, Role.KV_PREV)}),
        "diff": float((got[0] - user[0]).abs().max()),
        "rounded": all(torch.equal(a, b.to(torch.bfloat16)) for a, b in zip(kv_b, kv)),
        "caches_diff": max(float((a.float() - b.float()).abs().max()) for a, b in zip(caches, kv_b)),
    }
    return out


def _worker(rank: int, world: int) -> dict:
    import specdiff_fx
    from benchmarks import protocol
    from specdiff_zoo import load_shapes_dit
    from tests.family_models import flux2_inputs, tiny_flux2
    from tests.oracle import flux_inputs, tiny_flux

    out: dict = {}
    plain = {"inductor": False, "cache_ratio": 0.0}

    # tiny FLUX: the pass, exactness
    model, inputs = tiny_flux(0), flux_inputs(2, 8, 8, seed=0, text_len=6)
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    enable_context_parallel(model, world)
    out["graph"] = _graph_scenario(model, inputs)
    out["variants"] = _variant_scenario(model, inputs)
    torch._dynamo.reset()  # the attention score is not supported under CP: a logged fallback
    with torch.no_grad():
        got = torch.compile(model, backend="specdiff", options={"inductor": False, "score": "attention"})(
            **inputs, return_dict=False)[0]
    rec = specdiff_fx.last_record()
    out["attention_score"] = {"status": rec.status, "reason": rec.reason, "diff": float((got - ref).abs().max())}
    for name, options in (("plain", plain), ("first_call", {"inductor": False})):
        torch._dynamo.reset()
        with torch.no_grad():
            got = torch.compile(model, backend="specdiff", options=options)(**inputs, return_dict=False)[0]
        out[f"flux_{name}_diff"] = float((got - ref).abs().max())
        out[f"flux_{name}_record"] = specdiff_fx.last_record().status

    # what one rank does alone: a smaller memory cap (it would drop its text K/V caches alone), a
    # reset in the middle of a generation; the ranks must stay in lockstep (their collectives
    # crossed: a gloo abort, a hang until the group's timeout)
    def one_rank(options=None, on_step=None):
        torch._dynamo.reset()
        specdiff_fx.reset()
        x = _loop(torch.compile(model, backend="specdiff", options={"inductor": False, **(options or {})}),
                  inputs, 10, on_step)
        rep = specdiff_fx.last_generation()
        return {"x": x, "kinds": _kinds(rep), "notes": list(rep.notes),
                "agreed": len({_kinds(r) for r in specdiff_fx.gather_reports(rep)}) == 1}

    uncapped = one_rank()
    cap = {"max_cache_bytes": specdiff_fx.last_generation().cache_bytes - 1} if rank == 1 else {}
    out["one_rank"] = {"uncapped": uncapped, "cap": one_rank(cap),
                       "reset": one_rank(on_step=lambda i: specdiff_fx.reset() if i == 4 and rank == 1 else None)}

    # the trained FLUX model, sampled as FluxPipeline samples (no CFG, dynamic shift): the
    # benchmark's worker, untimed (one process, then both ranks at cache_ratio=0 and defaults)
    opts = {"model": "flux", "steps": STEPS, "prompts": protocol.PROMPTS[:1], "device": "cpu", "inductor": False,
            "warm": False}
    out["bench"] = cp_bench.worker(rank, world, opts)
    zoo = load_shapes_dit("flux")  # a rank whose memory cap forbids caches (rank 1 only)
    enable_context_parallel(zoo.transformer, world)
    options = {"inductor": False, "max_cache_bytes": 1} if rank == 1 else {"inductor": False}
    noise = protocol.initial_noise(0, zoo.image_size, 1)
    torch._dynamo.reset()
    with torch.no_grad():
        img = protocol.SAMPLERS["flux_nocfg"](zoo, torch.compile(zoo.transformer, backend="specdiff", options=options),
                                              protocol.PROMPTS[:1], noise, STEPS)
    rep = specdiff_fx.last_generation()
    out["capped"] = {"img": img, "kinds": _kinds(rep), "notes": list(rep.notes),
                     "agreed": len({_kinds(r) for r in specdiff_fx.gather_reports(rep)}) == 1}

    # tiny FLUX.2 (a second family with a context-parallel plan)
    model = tiny_flux2(0)
    inputs = flux2_inputs(1, 8, 8, seed=0)
    text = inputs["encoder_hidden_states"]  # one more text token: the shards must be equal
    inputs["encoder_hidden_states"] = torch.cat([text, text[:, :1].flip(-1)], dim=1)
    txt_ids = torch.zeros(text.shape[1] + 1, 4)
    txt_ids[:, 3] = torch.arange(text.shape[1] + 1)
    inputs["img_ids"], inputs["txt_ids"] = inputs["img_ids"][None], txt_ids[None]  # Flux2Pipeline: [B, L, 4]
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
    single_loop = _loop(model, inputs, 10)
    enable_context_parallel(model, world)
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="specdiff", options=plain)(**inputs, return_dict=False)[0]
    out["flux2_plain_diff"] = float((got - ref).abs().max())
    torch._dynamo.reset()
    loop = _loop(torch.compile(model, backend="specdiff", options={"inductor": False, "controller": "fixed"}),
                 inputs, 10)
    rep = specdiff_fx.last_generation()
    out["flux2_loop"] = {"kinds": _kinds(rep), "record": specdiff_fx.last_record().status,
                         "rel_err": float((loop - single_loop).norm() / single_loop.norm()),
                         "agreed": len({_kinds(r) for r in specdiff_fx.gather_reports(rep)}) == 1}
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn(WORLD, _worker, timeout=900, collective_timeout=300)


def test_collapse_ulysses_structure_and_numerics(ranks):
    for r in ranks:
        g = r["graph"]
        assert g["a2a_before"] == 4 * g["sdpa_before"] > 0  # q, k, v and the output of each attention
        assert g["ulysses_after"] == g["sdpa_before"] and g["exchanges_after"] == 0
        assert g["gather_after"] == 1 and g["gather_top_level"]
        assert g["parallel"][1:] == (WORLD, r["bench"]["rank"])
        assert g["collapsed_diff"] < 1e-6
        assert g["plan_tokens"] == 64 // WORLD and g["plan_parallel"] == g["parallel"]
        assert g["plan_attention"] == g["sdpa_before"] and g["untouched"]


def test_variants_keep_the_caches_in_the_exchanged_layout(ranks):
    """Full variant: every attention returns its exchanged K/V (every rank's image tokens,
    this rank's heads); sparse variants: every attention reads them and sends only the
    computed tokens through the exchange; with every token computed, a sparse call equals
    the full one and leaves the caches as the full call's (the previous ones shifted)."""
    for r in ranks:
        v = r["variants"]
        attn = v["attention"]
        assert v["full_kv_ops"] == attn and v["full_plain_ops"] == 0
        b, h_local, n_all, d = v["kv_shape"]
        assert (b, n_all) == (2, 64) and h_local * WORLD == 2  # tiny FLUX: 2 heads, 64 image tokens
        for context, s in v["sparse"].items():
            assert s["cached_ops"] == attn and s["plain_ops"] == 0 and s["global_index"] == 1, context
            assert s["k0_shape"] == v["kv_shape"], context
            assert s["diff"] < 1e-5 and s["caches_diff"] < 1e-5 and s["prev_diff"] < 1e-5, (context, s)
        assert v["sparse"]["cached"]["text_shape"] == (b, h_local, 6, d)  # 3 text tokens per rank
        assert v["sparse"]["compute"]["text_shape"] is None and v["sparse"]["compute"]["text_diff"] is None
        assert v["sparse"]["refresh"]["text_diff"] < 1e-5  # a refreshing step returns the exchanged text K/V
        bf16 = v["bf16"]
        assert bf16["returned"] == bf16["inputs"] == ["torch.bfloat16"] and bf16["texts"] > 0 and bf16["rounded"]
        assert bf16["diff"] < 1e-5 and bf16["caches_diff"] < 1e-2, bf16


def test_a_cached_call_sends_only_its_computed_tokens_through_the_exchange(ranks):
    for r in ranks:
        ex = r["bench"]["exchanged"]
        full, cached = ex["f"], ex["c"]
        assert len(full) == 1 and len(cached) == 1  # the same bytes on every call of a kind
        # 10 % of the image tokens (and no text tokens without CFG) of the queries, keys,
        # values and outputs; before, the keys and values of every token went through
        assert cached[0] <= 0.15 * full[0], (cached, full)


def test_attention_score_falls_back_under_context_parallelism(ranks):
    for r in ranks:
        a = r["attention_score"]
        assert a["status"] == "fallback" and "score='attention'" in a["reason"] and a["diff"] < 1e-5


def test_exact_at_cache_ratio_zero_and_on_the_first_full_call(ranks):
    for r in ranks:
        assert r["flux_plain_record"] == "plain" and r["flux_plain_diff"] < 1e-5
        assert r["flux_first_call_record"] == "specdiff" and r["flux_first_call_diff"] < 1e-5
        assert r["flux2_plain_diff"] < 1e-5


def test_defaults_cache_on_every_rank_as_close_as_one_process(ranks):
    from specdiff_fx import metrics

    single = ranks[0]["bench"]
    ref = single["ref"]
    single_psnr = single["single_psnr"]
    for r in ranks:
        run = r["bench"]
        assert run["parallel"][1:] == (WORLD, run["rank"]) and run["record"].startswith("[specdiff]")
        assert "c" in run["kinds"] and run["kinds"] == single["kinds"]  # the same decisions on every rank
        assert run["tokens"] * WORLD == run["whole_tokens"] == 256
        assert metrics.psnr(run["img_plain"], ref) > 60  # cache_ratio=0 under CP: full compute
        # as close to full compute as one process (token choice is per shard, so not identical)
        psnr = metrics.psnr(run["img_specdiff"], ref)
        assert psnr >= min(35.0, single_psnr - 2.0), (psnr, single_psnr)
        # FLOPs per rank: about 1/N of one process's, per call and over the generation
        assert 0.45 <= run["full_flops"] / single["single_full_flops"] <= 0.55
        assert 0.35 <= run["flops"] / single["single_flops"] <= 0.65
    assert {r["bench"]["rank"] for r in ranks} == set(range(WORLD))
    assert "| 2 ranks, specdiff, all ranks |" in cp_bench.table([r["bench"] for r in ranks])


def test_a_rank_that_computes_everything_makes_every_rank_do_so(ranks):
    from specdiff_fx import metrics

    for r in ranks:
        capped = r["capped"]
        assert capped["agreed"] and set(capped["kinds"]) == {"f"}
        assert metrics.psnr(capped["img"], ranks[0]["bench"]["ref"]) > 60  # every token computed on every rank
    assert any("max_cache_bytes" in n for n in ranks[1]["capped"]["notes"])


def test_what_one_rank_does_alone_every_rank_does(ranks):
    """A ``max_cache_bytes`` on one rank only is applied by every rank (the smallest), and
    ``specdiff_fx.reset()`` on one rank mid-generation makes every rank start over: no rank runs
    a variant the others do not (before: a gloo abort on a size mismatch, and a hang)."""
    for r in ranks:
        cap, reset = r["one_rank"]["cap"], r["one_rank"]["reset"]
        assert cap["agreed"] and reset["agreed"]
        assert any("max_cache_bytes" in n for n in cap["notes"])  # both ranks dropped a cache
        assert torch.isfinite(cap["x"]).all() and torch.isfinite(reset["x"]).all()
    assert torch.equal(ranks[0]["one_rank"]["cap"]["x"], ranks[1]["one_rank"]["cap"]["x"])


def test_flux2_caches_on_both_ranks(ranks):
    for r in ranks:
        loop = r["flux2_loop"]
        assert loop["record"] == "specdiff" and "c" in loop["kinds"] and loop["agreed"]
        assert loop["kinds"] == ranks[0]["flux2_loop"]["kinds"]
        assert loop["rel_err"] < 0.1


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_collapse_leaves_a_single_device_graph_alone(captured, name):
    from specdiff_fx.passes import collapse_ulysses

    c = captured(name)
    assert collapse_ulysses(c.gm) is c.gm and "specdiff_parallel" not in c.gm.meta


def test_aggregate_sums_the_ranks_and_refuses_ranks_that_disagree():
    import dataclasses

    import specdiff_fx
    from specdiff_fx import GenerationReport, StepRecord

    def report(rank: int, kinds: str) -> GenerationReport:
        steps = [StepRecord(i, 0, {"f": "full", "c": "cached"}[k], 1.0 - i / 10, (4,), (0,), (0,),
                            100 if k == "f" else 20) for i, k in enumerate(kinds)]
        return GenerationReport("flux", 4, 1, 0.9, 100, steps=steps, rank=rank, parallel=("0", 2, rank))

    whole = specdiff_fx.aggregate([report(0, "ffc"), report(1, "ffc")])
    assert whole.num_image_tokens == 8 and whole.full_flops == 200 and [s.flops for s in whole.steps] == [200, 200, 40]
    assert whole.flops_fraction == pytest.approx(440 / 600) and whole.parallel is None
    assert specdiff_fx.gather_reports(dataclasses.replace(report(0, "f"), parallel=None))[0].rank == 0
    with pytest.raises(ValueError, match="other decisions"):
        specdiff_fx.aggregate([report(0, "ffc"), report(1, "fff")])
