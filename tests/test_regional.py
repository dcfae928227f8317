"""Block-by-block compilation (``regional_compile=True``): regions follow the plan's blocks,
identical blocks share one compiled function, and the stitched graph computes what the whole
graph computes, outputs and in-place cache updates alike (tiny SD3 and FLUX)."""

import pytest
import torch

from specdiff_fx import SpecDiffConfig, analyze_dit, build_variant
from specdiff_fx.graph_utils import module_paths
from specdiff_fx.regional import compile_regions, region_labels
from specdiff_fx.runtime.context import text_mode
from specdiff_fx.signature import Role, VariantKey


def _variant(c, key_kind: str, **options):
    plan = analyze_dit(c.gm)
    cfg = SpecDiffConfig(**{"inductor": False, **options})
    if key_kind == "full":
        key = VariantKey.full()
    else:
        context, k_txt = text_mode(cfg.context_ratio, plan, guided=True)
        key = VariantKey.sparse(cfg.num_computed(plan.num_image_tokens), context, k_txt=k_txt)
    return plan, build_variant(c.gm, c.example_inputs, plan, cfg, key)


def _inputs(c, plan, v, seed=0):
    """The graph's inputs and random values for the variant's added ones (distinct indices)."""
    g = torch.Generator().manual_seed(seed)
    extra = []
    for spec in v.new_inputs:
        if spec.port.role in (Role.IDX, Role.TEXT_IDX):
            n = plan.num_image_tokens if spec.port.role is Role.IDX else plan.num_text_tokens
            rows = [torch.randperm(n, generator=g)[:spec.shape[1]].sort().values for _ in range(spec.shape[0])]
            extra.append(torch.stack(rows))
        elif spec.dtype.is_floating_point:
            extra.append(torch.randn(spec.shape, generator=g, dtype=spec.dtype))
        else:
            extra.append(torch.zeros(spec.shape, dtype=spec.dtype))
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in c.example_inputs] + extra


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_regions_follow_the_blocks(captured, name):
    c = captured(name)
    plan, v = _variant(c, "sparse")
    labels = region_labels(v.gm, plan)
    by_block: dict[str, set[int]] = {}
    for node, region in labels.items():
        for path, _ in module_paths(node):
            if path in {b.path for b in plan.blocks}:
                by_block.setdefault(path, set()).add(region)
    assert set(by_block) == {b.path for b in plan.blocks}
    assert all(len(r) == 1 for r in by_block.values()), by_block  # a block is one region
    assert len({r for rs in by_block.values() for r in rs}) == len(plan.blocks)  # each its own
    order = list(labels.values())
    assert order == sorted(order)  # contiguous runs in graph order
    assert max(order) + 1 >= len(plan.blocks) + 2  # the nodes before and after the blocks


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("kind", ["full", "sparse"])
def test_identical_blocks_share_one_compile_and_the_results_match(captured, name, kind):
    """With plain FX as the "compiler" (each region's own forward), so that only the split
    and the sharing are under test: the results equal the whole graph's bit for bit, and
    the caches it updates in place too."""
    c = captured(name)
    plan, v = _variant(c, kind)
    compiles = []

    def compile_fn(sub, args):
        compiles.append(sub)
        return sub.forward

    stitched = compile_regions(v.gm, _inputs(c, plan, v, seed=1), plan, compile_fn)
    stats = stitched.meta["specdiff_regions"]
    assert stats["compiled"] == len(compiles) < stats["regions"]  # SD3: blocks 0-1; FLUX: each kind
    whole_in, split_in = _inputs(c, plan, v), _inputs(c, plan, v)
    with torch.no_grad():
        want, got = v.gm(*whole_in), stitched(*split_in)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    for a, b in zip(whole_in, split_in):  # caches written in place
        assert torch.equal(a, b)


def test_inductor_regions_match_the_fx_variant(captured):
    """The option end to end: a sparse SD3 variant built with ``regional_compile=True`` gives
    what the plain FX variant gives (Inductor's rounding), caches included."""
    c = captured("sd3")
    plan, fx_variant = _variant(c, "sparse")
    _, regional = _variant(c, "sparse", inductor=True, regional_compile=True)
    stats = regional.fn.meta["specdiff_regions"]
    assert stats["compiled"] < stats["regions"]
    a_in, b_in = _inputs(c, plan, fx_variant), _inputs(c, plan, regional)
    with torch.no_grad():
        want, got = fx_variant(*a_in), regional(*b_in)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(a_in, b_in):  # a bfloat16 cache row (kv_dtype="auto") may round one unit apart
        tol = dict(rtol=1e-2, atol=1e-2) if a.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("name", ["sd3", "flux", "chroma", "flux2", "qwenimage", "wan"])
def test_regions_compile_inside_dynamo(name):
    """End to end through ``torch.compile``, every family (an accelerator compiles them block by
    block by default): the full variant is compiled while Dynamo compiles the frame, and the
    regions must not leave guards in Dynamo's shape environment (FLUX's regions, which receive
    non-contiguous views, once broke the frame's guards). The first call (a full step) gives
    the eager model's output."""
    from conftest import MODELS
    from family_models import FAMILY_MODELS
    from test_families import inputs_for

    if name in MODELS:
        make_model, make_inputs = MODELS[name]
        model, inputs = make_model(), make_inputs()
    else:
        model, inputs = FAMILY_MODELS[name][0](), inputs_for(name)
    torch._dynamo.reset()
    fn = torch.compile(model, backend="specdiff", options={"regional_compile": True})
    with torch.no_grad():
        want = model(**inputs, return_dict=False)[0]
        got = fn(**inputs, return_dict=False)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_regional_compile_is_a_checked_option():
    with pytest.raises(ValueError, match="regional_compile"):
        SpecDiffConfig(regional_compile="yes")
    assert SpecDiffConfig.from_options({"regional_compile": True}).regional_compile


def test_auto_compiles_block_by_block_on_an_accelerator_only():
    """``regional_compile="auto"`` (default): regions for inputs on a non-CPU device, whole graphs
    on the CPU (or with no tensor input); ``True`` / ``False`` hold on every device."""
    auto = SpecDiffConfig()
    assert auto.regional_compile == "auto"
    assert auto.regional_on(torch.device("cuda", 0)) and auto.regional_on("xpu")
    assert not auto.regional_on(torch.device("cpu")) and not auto.regional_on(None)
    assert SpecDiffConfig(regional_compile=True).regional_on("cpu")
    assert not SpecDiffConfig(regional_compile=False).regional_on("cuda")


@pytest.mark.parametrize("device, regional", [("cpu", False), ("cuda", True)])
def test_compile_graph_follows_the_inputs_device(captured, monkeypatch, device, regional):
    """``compile_graph`` decides from its example inputs' device (fake CUDA tensors stand in for a
    GPU's here): with the default, a graph of CUDA inputs goes to the regional compiler, one of
    CPU inputs to Inductor whole."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import specdiff_fx.regional
    import torch._inductor.compile_fx
    from specdiff_fx.variants import compile_graph

    c = captured("sd3")
    plan = analyze_dit(c.gm)
    called = []
    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", lambda *a, **k: called.append("whole"))
    monkeypatch.setattr(specdiff_fx.regional, "compile_regions", lambda *a, **k: called.append("regions"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = [torch.empty(a.shape, dtype=a.dtype, device=device) if isinstance(a, torch.Tensor) else a
                  for a in c.example_inputs]
    compile_graph(c.gm, inputs, SpecDiffConfig(), plan=plan)
    assert called == (["regions"] if regional else ["whole"])


def test_regions_with_other_tensor_constants_do_not_share():
    """A tensor literal in a node's arguments counts by identity (its repr elides the values of
    a large tensor, which could make two different regions look alike); equal graphs with equal
    inputs share."""
    import torch.fx as fx

    from specdiff_fx.regional import region_signature

    def region(const):
        g = fx.Graph()
        x = g.placeholder("x")
        g.output(g.call_function(torch.add, (x, const)))
        return fx.GraphModule(torch.nn.Module(), g)

    a, b = torch.zeros(5000), torch.zeros(5000)
    b[2500] = 1.0  # same repr as a
    assert repr(a) == repr(b)
    x = [torch.ones(5000)]
    assert region_signature(region(a), x) != region_signature(region(b), x)
    assert region_signature(region(a), x) == region_signature(region(a), x)
    assert region_signature(region(a), x) != region_signature(region(a), [torch.ones(5000, dtype=torch.float64)])
