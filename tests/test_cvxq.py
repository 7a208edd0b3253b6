"""CVXQ: global allocation (lambda search, optimality, size accounting), mixed-width cells through
GPTQ / plain rounding / CLAQ, sensitivities, and the artifact round trip."""

import itertools
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import rdquant
from rdquant.allocate import kappa, waterfill
from rdquant.cli import app
from rdquant.coding import recode
from rdquant.config import CompressConfig
from rdquant.errors import RdquantError
from rdquant.methods.cvxq import (allocate, cluster_cells, group_cells, group_rates, layer_stored_bits, model_layers,
                                  row_clusters)
from rdquant.methods.gptq import gptq_quantize, mixed_rtn, proxy_error
from rdquant.qmixed import MixedWeight, cluster_stored_bits, stored_bits, width_bits
from rdquant.runtime import QuantLinear
from rdquant.sensitivity import gradient_sensitivity, principal_directions
from rdquant.testing import tiny_model


def _hessian(n_in: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n_in, 2048, generator=g) * (torch.rand(n_in, 1, generator=g) + 0.2)
    return 2 * X @ X.t() / X.shape[1]


def _cells(n: int, seed: int, size: int = 64, max_bits: int = 6):
    g = torch.Generator().manual_seed(seed)
    weight = torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 100 + 1e-3
    sizes = torch.full((n,), float(size), dtype=torch.float64)
    return weight, group_rates(sizes, max_bits, width_bits(max_bits))


@pytest.mark.parametrize("seed", range(3))
def test_lambda_search_hits_integer_targets_exactly_and_fractional_ones_within_tolerance(seed):
    n = 500
    weight, _ = _cells(n, seed)
    plain = 64.0 * torch.arange(7, dtype=torch.float64)[None, :].expand(n, 7)  # codes only: steps of 64 bits
    for bits in (1, 2, 3, 4):
        w = waterfill(weight, plain, bits * 64.0 * n)
        assert float(plain.gather(1, w[:, None]).sum()) == bits * 64.0 * n
    weight, rate = _cells(n, seed)
    for target in (1.37, 2.5, 3.25):
        budget = target * 64 * n
        w = waterfill(weight, rate, budget)
        total = float(rate.gather(1, w[:, None]).sum())
        assert 0.995 * budget <= total <= budget


@pytest.mark.parametrize("seed", range(3))
def test_closed_form_widths_equal_the_table_search(seed, monkeypatch):
    """Rates that grow by a constant per bit take the closed form (no [cells, widths] tables): the same
    widths as the argmin over the tables, with mixed cell sizes and a fill of the leftover."""
    from rdquant import allocate as alloc

    g = torch.Generator().manual_seed(seed)
    n = 3000
    weight = torch.rand(n, generator=g, dtype=torch.float64) ** 3 * 100 + 1e-3
    sizes = torch.tensor([64.0, 48.0, 128.0], dtype=torch.float64)[torch.randint(0, 3, (n,), generator=g)]
    rate = group_rates(sizes, 6, width_bits(6)).to(torch.float32)
    assert alloc.affine_steps(rate, kappa(6)) is not None
    budgets = [t * float(sizes.sum()) for t in (1.3, 2.71, 4.0)]
    fast = [waterfill(weight, rate, b) for b in budgets]
    monkeypatch.setattr(alloc, "affine_steps", lambda r, k: None)
    for b, w in zip(budgets, fast):
        assert torch.equal(w, waterfill(weight, rate, b))


def test_water_filling_matches_brute_force_optimum():
    kap = kappa(3)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        weight = torch.rand(5, generator=g, dtype=torch.float64) * 10
        rate = 8.0 * torch.arange(4, dtype=torch.float64)[None, :].expand(5, 4)
        for budget in (24.0, 40.0, 64.0, 88.0):
            w = waterfill(weight, rate, budget, kap)
            got = float((weight * kap[w]).sum())
            best = min(float((weight * kap[list(c)]).sum()) for c in itertools.product(range(4), repeat=5)
                       if sum(8 * b for b in c) <= budget)
            assert got == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("cells", ["group", "cluster"])
def test_equal_sensitivity_and_variance_give_uniform_widths(cells):
    model = tiny_model("llama", 50, hidden=64, intermediate=128, layers=2)
    for lin in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        r, c = lin.weight.shape
        lin.weight.data = (torch.arange(r)[:, None] + torch.arange(c)[None, :]) % 2 * 2.0 - 1  # every cell: variance 1
    cfg = CompressConfig(method="cvxq", target_bits=3.0, cvxq_solver="rtn", group_size=32, cvxq_cells=cells)
    layers = model_layers(model, cfg)
    sens = {l.name: torch.ones(l.cols) for l in layers}
    three = 0
    for l in layers:
        cl = row_clusters(model.get_submodule(l.name).weight, sens[l.name], 32)
        shape = (l.rows, l.cols // 32) if cells == "group" else (int(cl.max()) + 1, l.cols)
        three += layer_stored_bits(torch.full(shape, 3, dtype=torch.uint8), l.rows, l.cols, cfg, l.bias, cl)
    widths, _, _, _ = allocate(model, layers, sens, cfg, three + 16)  # room for 3 bits everywhere, not one cell more
    assert all(bool((w == 3).all()) for w in widths.values())


def test_group_cells_statistics_and_ragged_last_group():
    W = torch.randn(4, 70)
    w, n = group_cells(W, torch.ones(70), 32)
    assert n.tolist() == [32, 32, 6] * 4
    ref = (W[1, 64:] - W[1, 64:].mean()).square().sum()
    assert float(w[5]) == pytest.approx(float(ref), rel=1e-6)


def test_mixed_gptq_equals_uniform_gptq_at_constant_width_and_beats_rounding():
    W = torch.randn(48, 160)
    H = _hessian(160)
    cfg = CompressConfig(bits=3, group_size=64)
    ref, _ = gptq_quantize(W, H, cfg)
    mixed, _ = gptq_quantize(W, H, cfg, widths=torch.full((48, 3), 3), max_width=7)
    assert isinstance(mixed, MixedWeight) and torch.equal(mixed.dequantize(), ref.dequantize())
    widths = torch.randint(0, 6, (48, 3), generator=torch.Generator().manual_seed(1))
    q, _ = gptq_quantize(W, H, cfg, widths=widths, max_width=7)
    r = mixed_rtn(W, widths, cfg, 7, torch.diagonal(H))
    assert proxy_error(W, q.dequantize(), H) < proxy_error(W, r.dequantize(), H)
    # width-0 cells hold one value (their centre); others stay on their own grid
    zero = widths == 0
    assert zero.any()
    for k in range(3):
        cells = q.dequantize()[:, 64 * k : 64 * (k + 1)]
        for row in torch.nonzero(zero[:, k]).flatten().tolist():
            assert cells[row].unique().numel() == 1
    assert int(q.codes.max()) < 2 ** 5


def test_mixed_layout_packs_exactly_and_round_trips_through_the_runtime_and_codecs(tmp_path):
    W = torch.randn(40, 100)
    widths = torch.randint(0, 8, (40, 2), generator=torch.Generator().manual_seed(2))
    cfg = CompressConfig(group_size=64)
    q = mixed_rtn(W, widths, cfg, max_width=7)
    state = q.packed_state()
    assert 8 * sum(t.numel() * t.element_size() for t in state.values()) == stored_bits(widths, 100, 64, 3)
    back = MixedWeight.from_packed(state, (40, 100), 64, 3)
    assert torch.equal(back.dequantize(), q.dequantize())
    lin = QuantLinear.from_quantized(q, torch.zeros(40))
    assert torch.equal(lin.dequantized_weight(), q.dequantize())
    with pytest.raises(ValueError):
        MixedWeight.from_packed({**state, "qweight": state["qweight"][:-1]}, (40, 100), 64, 3)


def test_row_clusters_follow_sensitivity_and_cluster_cells_are_their_statistics():
    W = torch.randn(150, 40)
    sens = torch.rand(150, 40) * torch.linspace(0.1, 3, 150)[:, None]  # later rows more sensitive
    cl = row_clusters(W, sens, 64).long()
    assert torch.bincount(cl).tolist() == [64, 64, 22]  # ragged last cluster
    mean = sens.mean(1)
    assert float(mean[cl == 0].min()) >= float(mean[cl == 1].max()) >= float(mean[cl == 2].min())
    w, n = cluster_cells(W, sens, cl.to(torch.int16))
    rows = cl == 1
    col = W[rows, 7]
    ref = (col - col.mean()).square().sum() * sens[rows, 7].mean()
    assert float(w[1 * 40 + 7]) == pytest.approx(float(ref), rel=1e-6) and float(n[2 * 40]) == 22


@pytest.mark.parametrize("proxy", [False, True])
def test_cell_statistics_take_a_fraction_of_the_matrix_in_float64(proxy):
    """The cells' float64 sums go a row panel at a time: at an 8B MLP matrix, whole-matrix float64 copies of W,
    W^2 and the sensitivities held 6x the float32 matrix (1.3 GiB) while the block's gradients were on the GPU."""
    from rdquant.testing import LiveBytes

    W = torch.randn(512, 1792)
    sens = torch.rand(1792) if proxy else torch.rand(512, 1792)
    nbytes = W.numel() * 4
    for step in (lambda: cluster_cells(W, sens, row_clusters(W, sens, 128)), lambda: group_cells(W, sens, 128)):
        with LiveBytes() as m:
            W.add_(0), sens.add_(0)  # counted from here: the inputs are not the step's
            base = m.live
            step()
        assert m.peak - base < 1.0 * nbytes, (m.peak - base) / nbytes
    # rows are independent: the panels give what one pass over the whole matrix gives, bit for bit
    Wd, Sd = W.double(), sens.double().expand(W.shape)
    idx = torch.arange(1792) // 128
    s1 = torch.zeros(512, 14, dtype=torch.float64).index_add_(1, idx, Wd)
    s2 = torch.zeros(512, 14, dtype=torch.float64).index_add_(1, idx, Wd.square())
    g2 = torch.zeros(512, 14, dtype=torch.float64).index_add_(1, idx, Sd) / 128
    assert torch.equal(group_cells(W, sens, 128)[0], ((s2 - s1.square() / 128).clamp_min(0) * g2).reshape(-1))


def test_companded_grid_levels_are_laplace_quantiles_and_rounding_picks_the_nearest():
    from rdquant.grid import companded_quantize
    from rdquant.qtensor import laplace_levels

    lv = laplace_levels(2)
    assert torch.allclose(lv, torch.tensor([-math.log(4), -math.log(4 / 3), math.log(4 / 3), math.log(4)]))
    assert torch.equal(laplace_levels(5), -laplace_levels(5).flip(0)) and torch.all(laplace_levels(5).diff() > 0)
    w = torch.randn(50, 40) * 3
    scale = torch.rand(50, 1) + 0.5
    bits = torch.randint(0, 5, (50, 1))
    codes, values = companded_quantize(w, scale, bits)
    for r in range(50):
        b = int(bits[r])
        cand = scale[r] * laplace_levels(b)
        best = (w[r][:, None] - cand[None, :]).abs().argmin(1)
        assert torch.allclose(values[r], cand[best]) and (b == 0 or torch.equal(codes[r].long(), best))


@pytest.mark.parametrize("grid", ["affine", "laplace"])
def test_cluster_cells_through_gptq_pack_exactly_split_by_layer_and_reload(tmp_path, grid):
    W = torch.randn(100, 96)
    H = _hessian(96, 3)
    cfg = CompressConfig(group_size=32)
    # two stacked layers (60 + 40 rows), each with its own clusters, numbered on
    cl = torch.cat([row_clusters(W[:60], torch.ones(60, 96), 32).long(), row_clusters(W[60:], torch.ones(40, 96), 32).long() + 2])
    widths = torch.randint(0, 6, (4, 96), generator=torch.Generator().manual_seed(4))
    q, _ = gptq_quantize(W, H, cfg, widths=widths, max_width=7, clusters=cl, companded=grid == "laplace")
    r = mixed_rtn(W, widths, cfg, 7, None, cl, grid)
    assert q.grid == r.grid == grid
    assert proxy_error(W, q.dequantize(), H) < proxy_error(W, r.dequantize(), H)
    D = q.dequantize()
    for k, c in torch.nonzero(widths == 0).tolist()[:20]:  # a width-0 cell holds one value
        assert D[cl == k, c].unique().numel() == 1
    codes_w = widths[cl]
    assert bool((q.codes.long() < (1 << codes_w)).all())
    for part, (a, b) in ((q.rows(0, 60), (0, 60)), (q.rows(60, 100), (60, 100))):
        state = part.packed_state()
        assert ("qzeros" in state) == (grid == "affine")
        assert (8 * sum(t.numel() * t.element_size() for t in state.values())
                == cluster_stored_bits(part.widths, part.clusters, 3, grid == "affine"))
        assert torch.equal(MixedWeight.from_packed(state, (b - a, 96), 32, 3, grid).dequantize(), D[a:b])
        assert torch.equal(QuantLinear.from_quantized(part, None).dequantized_weight(), D[a:b])
    with pytest.raises(ValueError, match="spans"):
        q.rows(0, 50)


def test_principal_directions_are_sorted_by_variance():
    model = tiny_model("llama", 60, hidden=32, intermediate=64, layers=1)
    ids = torch.randint(0, 60, (6, 24), generator=torch.Generator().manual_seed(0))
    U = principal_directions(model, ids, 8, 1, 3, torch.device("cpu"))
    with torch.no_grad():
        z = model.base_model(ids).last_hidden_state.reshape(-1, 32)
    var = (z @ U).square().mean(0)
    assert torch.all(var[:-1] >= var[1:] * (1 - 1e-4))
    assert torch.allclose(U.t() @ U, torch.eye(8), atol=1e-4)


def test_random_sign_gradient_estimate_matches_the_exact_sum_over_components():
    torch.manual_seed(0)
    model = tiny_model("llama", 40, hidden=16, intermediate=32, layers=1)
    ids = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(1))
    name = "model.layers.0.mlp.down_proj"
    k, stride = 4, 3
    U = principal_directions(model, ids, k, stride, 1, torch.device("cpu"))
    W = model.get_submodule(name).weight
    W.requires_grad_(True)
    exact = torch.zeros_like(W)
    z = model.base_model(ids).last_hidden_state[0, ::stride] @ U
    for t in range(z.shape[0]):
        for i in range(k):
            (g,) = torch.autograd.grad(z[t, i], W, retain_graph=True)
            exact += g.square()
    W.requires_grad_(False)
    est = gradient_sensitivity(model, ids.expand(600, -1), [name], components=k, stride=stride, batch_size=1,
                               progress=False)[name]
    assert float((est - exact).abs().sum() / exact.abs().sum()) < 0.15


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from rdquant.testing import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("cvxq-tiny"), "llama", hidden=64, intermediate=160, layers=2)


@pytest.mark.parametrize("solver,sens,cells,grid", [("gptq", "gradient", "group", "uniform"),
                                                   ("rtn", "hessian", "group", "uniform"),
                                                   ("claq", "gradient", "group", "uniform"),
                                                   ("gptq", "fisher", "cluster", "uniform"),
                                                   ("rtn", "hessian", "cluster", "laplace")])
def test_planned_size_is_the_artifacts_byte_count_and_reload_is_exact(tiny_dir, tmp_path, solver, sens, cells, grid):
    cfg = CompressConfig(method="cvxq", target_bits=3.3, cvxq_solver=solver, cvxq_sensitivity=sens, cvxq_cells=cells,
                         cvxq_grid=grid,
                         calib_samples=8, calib_seqlen=64, cvxq_samples=8, bias_correction=solver == "rtn")
    cm = rdquant.compress(str(tiny_dir), cfg, progress=False)
    plan = cm.method_state
    out = cm.save(tmp_path / "a")
    rep = rdquant.inspect(out)
    # with a gradient sensitivity the embedding / head are cells of the allocation (--embed-bits auto)
    assert bool(plan.vocab) == (sens != "hessian")
    params = rep.quantized_params + (rep.vocab_params if plan.vocab else 0)
    stored = rep.quantized_bytes + (rep.vocab_bytes if plan.vocab else 0)
    assert 8 * stored == pytest.approx(plan.planned_bits * params, abs=1e-6)
    assert 0.995 * 3.3 <= 8 * stored / params <= 3.3
    assert len({round(v, 3) for v in plan.summary.values()}) > 1  # bits moved between layers
    loaded = rdquant.load(out)
    for n, m in cm.model.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(m.dequantized_weight(), loaded.get_submodule(n).dequantized_weight())
            assert (m.bias is not None) == (solver == "rtn" and m.kind == "linear")
    coded = recode(out, tmp_path / "ans", codec="ans")
    x = torch.arange(32).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(rdquant.load(coded)(x).logits, loaded(x).logits)


def test_bias_correction_removes_the_mean_output_error(tiny_dir):
    from rdquant.models import load_model

    model, tok, _ = load_model(str(tiny_dir))
    ids = torch.randint(0, len(tok), (8, 64), generator=torch.Generator().manual_seed(0))
    name = "model.layers.0.self_attn.q_proj"  # the first stage: its inputs do not depend on quantization
    xs = []
    h = model.get_submodule(name).register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    X = torch.cat(xs)
    W = model.get_submodule(name).weight.data.clone()
    cfg = CompressConfig(method="cvxq", target_bits=3.0, cvxq_solver="rtn", cvxq_sensitivity="hessian",
                         cvxq_samples=8, bias_correction=True)
    cm = rdquant.compress(model, cfg, calib_ids=ids, progress=False)
    q = cm.model.get_submodule(name)
    Q = q.dequantized_weight().detach()
    err = X @ (W - Q).t()  # output error per token without the bias
    assert float(err.mean(0).abs().max()) > 1e-3
    assert torch.allclose(q.bias.detach().float(), err.mean(0), atol=1e-4)
    assert float((err - q.bias.detach().float()).mean(0).abs().max()) < 1e-4


def test_target_size_and_total_never_exceeded(tiny_dir, tmp_path):
    from rdquant.models import load_model

    model, _, _ = load_model(str(tiny_dir))
    layers = model_layers(model, CompressConfig(method="cvxq", target_bits=3))
    n = sum(l.rows * l.cols for l in layers)
    size = int(3.1 * n / 8)
    cm = rdquant.compress(str(tiny_dir), CompressConfig(method="cvxq", target_size=size, cvxq_solver="rtn", embed_bits=8,
                                                        calib_samples=4, calib_seqlen=32, cvxq_samples=4), progress=False)
    rep = rdquant.inspect(cm.save(tmp_path / "s"))
    assert 0.995 * size <= rep.quantized_bytes <= size
    from rdquant.methods.cvxq import dense_bytes

    kw = dict(method="cvxq", cvxq_solver="rtn", calib_samples=4, calib_seqlen=32, cvxq_samples=4, embed_bits=8)
    total = dense_bytes(model, layers, CompressConfig(target_size_total=1, **kw)) + size  # 8-bit embedding, head
    cm = rdquant.compress(str(tiny_dir), CompressConfig(target_size_total=total, **kw), progress=False)
    out = cm.save(tmp_path / "t")
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert on_disk <= total and 0.995 * size <= rdquant.inspect(out).quantized_bytes <= size
    # --embed-bits auto: the embedding and head are in the allocation; the file still meets the total
    auto = CompressConfig(target_size_total=total, **{**kw, "embed_bits": -1, "cvxq_solver": "gptq"})
    cm = rdquant.compress(str(tiny_dir), auto, progress=False)
    out = cm.save(tmp_path / "u")
    rep = rdquant.inspect(out)
    on_disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert on_disk <= total and rep.vocab_params and cm.method_state.vocab
    assert {l.bits for l in rep.layers if l.kind != "linear"} == set(cm.method_state.vocab.values())
    budget = total - dense_bytes(model, layers, auto)  # what the allocation spends: linears, embedding, head
    assert 0.995 * budget <= rep.quantized_bytes + rep.vocab_bytes <= budget


def test_config_and_command_line(tiny_dir, tmp_path):
    with pytest.raises(RdquantError, match="needs --target-bits"):
        CompressConfig(method="cvxq")
    with pytest.raises(RdquantError, match="one of"):
        CompressConfig(method="cvxq", target_bits=3, target_size=10)
    with pytest.raises(RdquantError, match="need --method cvxq"):
        CompressConfig(target_size=10)
    with pytest.raises(RdquantError, match="solver"):
        CompressConfig(method="cvxq", target_bits=3, cvxq_solver="magic")
    runner = CliRunner()
    out = tmp_path / "cli"
    r = runner.invoke(app, ["compress", "--model", str(tiny_dir), "--method", "cvxq", "--target-size", "0.05MB",
                            "--solver", "rtn", "--experimental", "cvxq_sensitivity=hessian", "--calib-samples", "4",
                            "--calib-seqlen", "32", "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    rep = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    assert 0.995 * 50_000 <= rep["quantized_bytes"] <= 50_000
    from rdquant.artifact import read_manifest

    manifest = read_manifest(out)
    assert manifest["recipe"]["group_size"] == 128 and manifest["recipe"]["cvxq_cells"] == "cluster"  # cvxq defaults
    assert all(l.get("clusters") for l in manifest["quantized"].values() if l.get("kind", "linear") == "linear")
    r = runner.invoke(app, ["compress", "--model", str(tiny_dir), "--method", "cvxq", "--target-size", "5 parsecs",
                            "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "cannot read the size" in r.output
    r = runner.invoke(app, ["compress", "--model", str(tiny_dir), "--method", "cvxq", "--target-bits", "0.2",
                            "--calib-samples", "4", "--calib-seqlen", "32", "--out", str(tmp_path / "y"), "--no-progress"])
    assert r.exit_code != 0 and "cannot be met" in r.output


def test_grid_kappa_is_decreasing_and_knows_one_bit_grids_are_poor():
    from rdquant.methods.cvxq import grid_kappa

    k = grid_kappa(64, 6, 20, 0.3, samples=500)
    assert k[0] == 1 and torch.all(k[1:] < k[:-1])
    assert k[1] > 2 * kappa(1)[1]  # an integer zero point puts one of the two levels at 0
    assert k[4] == pytest.approx(float(kappa(4)[4]), rel=0.5)  # close to Lloyd-Max at higher widths


def test_min_bits_keeps_every_cell_at_least_that_wide(tiny_dir):
    cfg = CompressConfig(method="cvxq", target_bits=3.0, cvxq_min_bits=2, cvxq_solver="rtn", cvxq_sensitivity="hessian",
                         calib_samples=4, calib_seqlen=32, cvxq_samples=4)
    plan = rdquant.compress(str(tiny_dir), cfg, progress=False).method_state
    assert min(int(w.min()) for w in plan.widths.values()) >= 2 and 0.995 * 3 <= plan.planned_bits <= 3
    with pytest.raises(RdquantError, match="min-bits"):
        CompressConfig(method="cvxq", target_bits=3, cvxq_min_bits=5, cvxq_max_bits=4)


def test_coded_code_bits_are_the_layer_entropy_per_width():
    """--rate coded: a cell's codes at width b cost -log2 of their frequency in the layer at b; summed
    over the layer that is the layer's code entropy, below b bits a code for bell-shaped weights."""
    from rdquant.methods.cvxq import coded_code_bits

    W = torch.randn(96, 130, generator=torch.Generator().manual_seed(5))
    cfg = CompressConfig(method="cvxq", target_bits=3, group_size=64, cvxq_rate="coded", clip_search=0)
    for clusters in (None, row_clusters(W, torch.ones(130), 64)):
        bits = coded_code_bits(W, cfg, 2, 5, clusters)
        assert bits.shape == ((96 * 3 if clusters is None else 2 * 130), 6)
        assert bool(torch.isfinite(bits).all()) and float(bits[:, 0].abs().sum()) == 0  # width 0 stores no codes
        sizes = bits[:, 1]  # width 1 is below lo = 2: nominal, one bit per code
        assert float(sizes.sum()) == W.numel()
        for b in range(2, 6):
            shape = (96, 3) if clusters is None else (2, 130)
            codes = mixed_rtn(W, torch.full(shape, b), cfg, 5, None, clusters).codes.reshape(-1).long()
            p = torch.bincount(codes, minlength=1 << b).double() / codes.numel()
            entropy = float(-(p[p > 0] * p[p > 0].log2()).sum()) * codes.numel()
            assert float(bits[:, b].sum()) == pytest.approx(entropy, rel=1e-9)
            assert entropy < 0.97 * b * W.numel()


def test_coded_rate_targets_the_coded_size(tiny_dir, tmp_path):
    """The same target buys more stored bits with --rate coded, and the artifact coded with `auto`
    lands near the target (the side information, counted as stored, codes a little smaller)."""
    common = dict(method="cvxq", target_bits=3.0, cvxq_solver="rtn", cvxq_sensitivity="hessian", calib_samples=8,
                  calib_seqlen=64, cvxq_samples=8)
    stored = rdquant.inspect(rdquant.compress(str(tiny_dir), CompressConfig(**common), progress=False).save(tmp_path / "s"))
    cm = rdquant.compress(str(tiny_dir), CompressConfig(**common, cvxq_rate="coded"), progress=False)
    out = cm.save(tmp_path / "c")
    packed = rdquant.inspect(out)
    assert 0.99 * 3.0 <= cm.method_state.planned_bits <= 3.0
    assert stored.bits_per_weight <= 3.0 < packed.bits_per_weight
    coded = rdquant.inspect(recode(out, tmp_path / "auto", codec="auto"))
    assert 0.9 * 3.0 <= coded.coded_bits_per_weight <= 1.05 * 3.0
    assert any(l.mapping == "mixed-widths" for l in coded.layers)
    with pytest.raises(RdquantError, match="rate coded"):
        CompressConfig(method="cvxq", target_bits=3, cvxq_solver="claq", claq_share=1, cvxq_rate="coded")
    with pytest.raises(RdquantError, match="cvxq_rate .*choose one of"):
        CompressConfig(method="cvxq", target_bits=3, cvxq_rate="entropy")
