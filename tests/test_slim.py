"""SLiM: 2:4 masks, SLiM-Quant, the 2:4 layout's round trip, the adapters' algebra and size accounting,
and the method end to end (compress, save, load, inspect, tune) on tiny models."""

import json

import pytest
import torch

import rdquant
from rdquant import adapters, lowrank, packing
from rdquant.errors import ArtifactError, RdquantError
from rdquant.lowrank import adapter_nbytes, adapter_rank, saliency_lowrank
from rdquant.methods.slim import slim_quant_alpha, slim_quantize, wanda_mask
from rdquant.models import load_model
from rdquant.qsparse import Sparse24Weight, SparseHalfWeight, pack_meta, unpack_meta


def _problem(out_f=48, in_f=72, n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(in_f, n, generator=g) * torch.rand(in_f, 1, generator=g) * 3
    return W, 2 * X @ X.t() / n


def _runs_keep_two(mask: torch.Tensor) -> bool:
    return bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


@pytest.mark.parametrize("mask,solver,scale", [("wanda", "gptq", "group"), ("sparsegpt", "gptq", "group"),
                                               ("wanda", "rtn", "matrix"), ("sparsegpt", "gptq", "matrix")])
def test_slim_keeps_exactly_two_of_every_four_and_prunes_the_rest(mask, solver, scale):
    W, H = _problem()  # 72 inputs: a ragged last group of 8 at group size 64
    cfg = rdquant.CompressConfig(method="slim", slim_mask=mask, slim_solver=solver, slim_scale=scale, bits=4)
    qw, _ = slim_quantize(W, H, cfg)
    m = qw.mask()
    assert _runs_keep_two(m)
    Q = qw.dequantize()
    assert bool((Q[~m] == 0).all())
    if mask == "wanda":  # the mask comes from the original weights and the input norms alone
        assert torch.equal(m, wanda_mask(W, torch.diagonal(H)))


@pytest.mark.parametrize("mask,solver", [("wanda", "gptq"), ("sparsegpt", "gptq"), ("wanda", "rtn")])
def test_unstructured_keeps_exactly_half_of_every_row(mask, solver):
    W, H = _problem()  # 72 inputs: lazy blocks of 64 and 8, a ragged last group of 8
    cfg = rdquant.CompressConfig(method="slim", slim_pattern="unstructured", slim_mask=mask, slim_solver=solver,
                                 bits=4, block_size=64)
    qw, _ = slim_quantize(W, H, cfg)
    assert isinstance(qw, SparseHalfWeight)
    m = qw.mask()
    assert bool((m.sum(1) == 36).all())
    assert not _runs_keep_two(m)  # a free mask, not 2:4 by accident
    Q = qw.dequantize()
    assert bool((Q[~m] == 0).all())
    if mask == "wanda":  # the larger half of each row's |W| sqrt(H_jj)
        score = W.abs() * torch.diagonal(H).sqrt()
        kept_min = torch.where(m, score, torch.inf).amin(1)
        dropped_max = torch.where(m, -torch.inf, score).amax(1)
        assert bool((kept_min >= dropped_max).all())
    else:  # SparseGPT's choice: half of each row within every lazy block of the sweep
        assert bool((m[:, :64].sum(1) == 32).all()) and bool((m[:, 64:].sum(1) == 4).all())


def test_unstructured_beats_2_4_at_the_same_bytes():
    """Both keep half the weights and spend 2 bits per kept value on positions: the freer mask errs less."""
    W, H = _problem(seed=3)
    err, nbytes = {}, {}
    for pattern in ("2:4", "unstructured"):
        qw, _ = slim_quantize(W, H, rdquant.CompressConfig(method="slim", slim_pattern=pattern))
        D = W - qw.dequantize()
        err[pattern] = float(((D @ H) * D).sum())
        nbytes[pattern] = sum(t.numel() * t.element_size() for t in qw.packed_state().values())
    assert nbytes["unstructured"] == nbytes["2:4"]
    assert err["unstructured"] < err["2:4"]


def test_unstructured_layout_round_trip_and_damaged_mask():
    W, H = _problem()
    qw, _ = slim_quantize(W, H, rdquant.CompressConfig(method="slim", slim_pattern="unstructured", symmetric=False))
    state = qw.packed_state()
    assert state["qweight"].numel() == packing.packed_nbytes(48 * 36, 4)
    assert state["bitmask"].numel() == 48 * 72 // 8  # 1 bit per weight = 2 bits per kept value
    back = SparseHalfWeight.from_packed(state, qw.shape, qw.bits, qw.group_size)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.equal(back.mask(), qw.mask())
    bad = dict(state, bitmask=torch.full_like(state["bitmask"], 0xFF))  # every weight "kept"
    with pytest.raises(ValueError, match="half of every row"):
        SparseHalfWeight.from_packed(bad, qw.shape, qw.bits, qw.group_size)


def test_refit_reaches_the_masked_least_squares_optimum():
    from rdquant.methods.slim import refit_kept

    W, H = _problem(out_f=6, in_f=32, seed=4)
    mask = wanda_mask(W, torch.diagonal(H))
    got = refit_kept(W, H, mask, iters=60, damp=0.0)
    Hd = H.double()
    for r in range(W.shape[0]):  # each row: w~_S = w_S + H_SS^-1 H_SP w_P, w~_P = 0
        S, P = mask[r], ~mask[r]
        want = W[r, S].double() + torch.linalg.solve(Hd[S][:, S], Hd[S][:, P] @ W[r, P].double())
        torch.testing.assert_close(got[r, S].double(), want, rtol=1e-3, atol=1e-4)
        assert bool((got[r, P] == 0).all())


def test_the_refit_lowers_the_layer_error():
    W, H = _problem(seed=5)
    err = {}
    for refit in (False, True):
        qw, _ = slim_quantize(W, H, rdquant.CompressConfig(method="slim", slim_refit=refit))
        D = W - qw.dequantize()
        err[refit] = float(((D @ H) * D).sum())
    assert err[True] < err[False]


def test_error_feedback_beats_plain_rounding_on_the_same_mask():
    W, H = _problem(seed=1)
    err = {}
    for solver in ("gptq", "rtn"):
        qw, _ = slim_quantize(W, H, rdquant.CompressConfig(method="slim", slim_mask="wanda", slim_solver=solver))
        D = W - qw.dequantize()
        err[solver] = float(((D @ H) * D).sum())
    assert err["gptq"] < err["rtn"]


def test_wanda_weighs_magnitude_by_the_input_norm():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert wanda_mask(W, torch.ones(4)).tolist() == [[False, False, True, True]]
    assert wanda_mask(W, torch.tensor([100.0, 100.0, 1.0, 1.0])).tolist() == [[True, True, False, False]]


def test_slim_quant_alpha_is_the_histogram_minimum():
    """Coarse then fine search equals the exhaustive minimum over the bin centres (a smooth objective)."""
    W = torch.randn(200, 300, generator=torch.Generator().manual_seed(2))
    alpha = slim_quant_alpha(W, 4)
    a = W.abs().reshape(-1)
    nbins = 512
    p = torch.histc(a, nbins, 0, float(a.max()))
    v = (torch.arange(nbins) + 0.5) * float(a.max()) / nbins

    def err(al):
        step = al / 7
        return float((((v - torch.clamp(torch.round(v / step), max=7) * step) ** 2) * p).sum())

    best = min(v.tolist(), key=err)
    assert err(alpha) <= err(best) * 1.001
    assert 0.3 * float(a.max()) < alpha < float(a.max())  # clipped, but not to nothing


def test_layout_round_trip_and_damaged_metadata():
    W, H = _problem()
    qw, _ = slim_quantize(W, H, rdquant.CompressConfig(method="slim", symmetric=False))
    state = qw.packed_state()
    assert state["qweight"].numel() == packing.packed_nbytes(48 * 36, 4)
    assert state["meta"].numel() == 48 * 72 // 8  # 2 bits per kept value
    back = Sparse24Weight.from_packed(state, qw.shape, qw.bits, qw.group_size)
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert torch.equal(unpack_meta(pack_meta(qw.idx), 48, 72), qw.idx)
    bad = dict(state, meta=torch.full_like(state["meta"], 0xFF))  # nibble 0b1111: idx0 = idx1 = 3
    with pytest.raises(ValueError, match="2:4 position pair"):
        Sparse24Weight.from_packed(bad, qw.shape, qw.bits, qw.group_size)


def test_adapters_are_the_saliency_weighted_best_rank_r_approximation():
    g = torch.Generator().manual_seed(3)
    E = torch.randn(40, 24, generator=g, dtype=torch.float64)
    s = torch.rand(24, generator=g, dtype=torch.float64) + 0.1
    D, U = saliency_lowrank(E, s, 5)
    assert D.shape == (5, 24) and U.shape == (40, 5)
    sq = s.sqrt()
    u, S, vh = torch.linalg.svd(E * sq, full_matrices=False)
    best = (u[:, :5] * S[:5]) @ vh[:5] / sq  # Eckart-Young in the sqrt(s)-weighted norm, float64
    torch.testing.assert_close((U @ D).double(), best, rtol=1e-4, atol=1e-4)
    D, U = saliency_lowrank(E, s, 24)  # full rank: exact
    torch.testing.assert_close((U @ D).double(), E, rtol=1e-4, atol=1e-4)


def test_quantized_adapters_stay_close_to_the_float_ones():
    """4-bit factors are the fp16 factors up to rounding (a transposed SVD factor once went through a
    row-major-only dequantization and came out 500x too large)."""
    from rdquant.lowrank import fit_adapters
    from rdquant.qtensor import dequantize_grouped

    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 256, generator=g) * 0.02
    Q = W + torch.randn(256, 256, generator=g) * 0.005
    h = torch.rand(256, generator=g) * 10
    d16, d4 = (fit_adapters(W, Q, h, rdquant.CompressConfig(method="slim", lowrank=0.1, lowrank_bits=b)).delta()
               for b in (16, 4))
    assert float((d4 - d16).norm() / d16.norm()) < 0.2
    codes = torch.randint(0, 16, (40, 24), generator=g, dtype=torch.uint8)
    scales, zeros = torch.rand(24, 3, generator=g), torch.full((24, 3), 8.0)
    assert torch.equal(dequantize_grouped(codes.t(), scales, zeros, 16),
                       dequantize_grouped(codes.t().contiguous(), scales, zeros, 16))


def test_dead_input_channels_keep_the_weighting_invertible():
    E = torch.randn(8, 8)
    s = torch.ones(8)
    s[3] = 0
    D, U = saliency_lowrank(E, s, 2)
    assert torch.isfinite(D).all() and torch.isfinite(U).all()


def test_rank_rounds_up_to_a_tile():
    assert adapter_rank(0.1, 576, 1536) == 64  # 57.6 -> 64 (tile 16)
    assert adapter_rank(0.1, 4096, 14336) == 512  # 409.6 -> 512 (tile 128)
    assert adapter_rank(0.0, 576, 576) == 0
    assert adapter_rank(1.0, 20, 30) == 20  # never above min(in, out)


@pytest.mark.parametrize("bits", [4, 16])
def test_adapter_bytes_are_what_is_stored(bits):
    cfg = rdquant.CompressConfig(method="gptq", lowrank=0.25, lowrank_bits=bits, lowrank_group=16)
    W = torch.randn(40, 72)
    lr = lowrank.fit_adapters(W, torch.zeros_like(W), torch.ones(72), cfg)
    stored = lr.packed_state()
    assert set(stored) <= set(adapters.STORED)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == adapter_nbytes(72, 40, cfg)
    shapes = adapters.buffers(lr.spec(), 72, 40)
    assert {k: (t.dtype, tuple(t.shape)) for k, t in stored.items()} == shapes


def _cfg(**kw):
    return rdquant.CompressConfig(calib_samples=8, calib_seqlen=64, batch_size=4, embed_bits=16, **kw)


@pytest.mark.parametrize("kw", [dict(method="slim", lowrank=0.25, lowrank_group=16),
                                dict(method="gptq", bits=3, lowrank=0.25, lowrank_bits=16)])
def test_compress_save_load_inspect_with_adapters(tiny_model_dir, tmp_path, kw):
    model, tok, mid = load_model(str(tiny_model_dir))
    cm = rdquant.compress(model, _cfg(**kw), tokenizer=tok, progress=False, model_id=mid)
    out = cm.save(tmp_path / "a", codec="auto")
    loaded = rdquant.load(out)
    x = torch.arange(40).unsqueeze(0) * 7 % 300
    with torch.no_grad():
        assert torch.equal(cm.model(x).logits, loaded(x).logits)
    rep = rdquant.inspect(out)
    split = rep.split_bits()
    n = rep.quantized_params
    expected = sum(adapter_nbytes(l.shape[1], l.shape[0], _cfg(**kw)) for l in rep.layers if l.kind == "linear")
    assert split["adapters"] == pytest.approx(8 * expected / n)
    if kw["method"] == "slim":
        assert split["codes"] == pytest.approx(2.0)  # half the weights at 4 bits
        assert split["sparsity"] == pytest.approx(1.0)  # 2 bits per kept value
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 5  # a version-4 reader would drop the adapters: it must refuse
    entry = manifest["quantized"]
    assert all(e["lowrank"]["rank"] == 16 for e in entry.values())
    lin = next(m for m in loaded.modules() if isinstance(m, rdquant.runtime.QuantLinear))
    assert "lowrank=16" in repr(lin)
    with pytest.raises(RdquantError, match="low-rank adapters"):
        rdquant.export(out, tmp_path / "ct", format="compressed-tensors", progress=False)


def test_the_adapters_repair_part_of_the_error(tiny_model_dir):
    """The same method with adapters has a lower layer-output error on every layer."""
    errs = {}
    for frac in (0.0, 0.25):
        model, tok, mid = load_model(str(tiny_model_dir))
        cm = rdquant.compress(model, _cfg(method="slim", lowrank=frac, lowrank_bits=16), tokenizer=tok, progress=False)
        errs[frac] = {l.name: l.proxy_error for l in cm.logs}
    assert all(errs[0.25][k] < errs[0.0][k] for k in errs[0.0])


@pytest.mark.parametrize("kw", [dict(method="cvxq", target_bits=6.0), dict(method="claq", target_bits=6.5)])
def test_size_targets_count_the_adapters(tiny_model_dir, kw):
    model, tok, mid = load_model(str(tiny_model_dir))
    cm = rdquant.compress(model, _cfg(lowrank=0.25, **kw), tokenizer=tok, progress=False)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        rep = rdquant.inspect(cm.save(Path(d) / "a"))
    assert rep.split_bits()["adapters"] > 1.0
    assert kw["target_bits"] - 0.05 < rep.bits_per_weight <= kw["target_bits"] + 1e-6


def test_tuning_moves_only_the_adapters(tiny_model_dir):
    model, tok, mid = load_model(str(tiny_model_dir))
    cfg = _cfg(method="slim", lowrank=0.25, lowrank_bits=16, tune_steps=3, tune_batch=2)
    cm = rdquant.compress(model, cfg, tokenizer=tok, progress=False)
    model2, tok, _ = load_model(str(tiny_model_dir))
    ref = rdquant.compress(model2, cfg.replace(tune_steps=0), tokenizer=tok, progress=False)
    a = dict(cm.model.named_buffers())
    b = dict(ref.model.named_buffers())
    moved = {k.rpartition(".")[2] for k in a if not torch.equal(a[k], b[k])}
    assert moved and moved <= {"lowrank_down", "lowrank_up"}


def test_bad_input_is_refused_before_work(tmp_path):
    with pytest.raises(RdquantError, match="sparsegpt"):
        rdquant.CompressConfig(method="slim", slim_mask="sparsegpt", slim_solver="rtn")
    with pytest.raises(RdquantError, match="not used"):
        rdquant.config.from_settings({}, {"method": "gptq", "slim_mask": "wanda"})
    with pytest.raises(RdquantError, match="lowrank_bits is not used by method gptq without --lowrank"):
        rdquant.config.from_settings({}, {"method": "gptq", "lowrank_bits": 8})  # without --lowrank


def test_odd_widths_are_refused_before_calibration(tmp_path):
    from rdquant.testing import save_tiny_model_dir

    d = save_tiny_model_dir(tmp_path / "m", "llama", intermediate=162)
    with pytest.raises(RdquantError, match="multiple of 4"):
        rdquant.compress(str(d), _cfg(method="slim"), progress=False)
    d = save_tiny_model_dir(tmp_path / "m2", "llama", intermediate=161)
    with pytest.raises(RdquantError, match="multiple of 2, so it cannot be unstructured"):
        rdquant.compress(str(d), _cfg(method="slim", slim_pattern="unstructured"), progress=False)


def test_unstructured_artifact_loads_inspects_and_says_version_8(tiny_model_dir, tmp_path):
    model, tok, mid = load_model(str(tiny_model_dir))
    cm = rdquant.compress(model, _cfg(method="slim", slim_pattern="unstructured", lowrank=0.25, lowrank_group=16),
                          tokenizer=tok, progress=False, model_id=mid)
    out = cm.save(tmp_path / "a", codec="auto")
    loaded = rdquant.load(out)
    x = torch.arange(40).unsqueeze(0) * 7 % 300
    with torch.no_grad():
        assert torch.equal(cm.model(x).logits, loaded(x).logits)
    split = rdquant.inspect(out).split_bits()
    assert split["codes"] == pytest.approx(2.0) and split["sparsity"] == pytest.approx(1.0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 8
    assert {e["layout"] for e in manifest["quantized"].values()} == {"sparse50"}
    lin = next(m for m in loaded.modules() if isinstance(m, rdquant.runtime.QuantLinear))
    assert "50% sparse" in repr(lin)
    with pytest.raises(RdquantError, match="cannot export layer"):
        rdquant.export(out, tmp_path / "ct", format="compressed-tensors", progress=False)


def test_damaged_adapter_tensors_are_an_artifact_error(tiny_model_dir, tmp_path):
    model, tok, mid = load_model(str(tiny_model_dir))
    cm = rdquant.compress(model, _cfg(method="rtn", lowrank=0.25), tokenizer=tok, progress=False)
    lin = next(m for m in cm.model.modules() if isinstance(m, rdquant.runtime.QuantLinear))
    lin._buffers["lowrank_up_scales"] = lin.lowrank_up_scales[:1]
    with pytest.raises(ArtifactError, match="adapters"):
        lin.low_rank()


def test_plain_artifacts_keep_format_version_4():
    from rdquant.artifact import format_version

    assert format_version({"a": {"bits": 4}, "b": {"layout": "mixed"}}) == 4
    assert format_version({"a": {"layout": "sparse24"}}) == 5
    assert format_version({"a": {"layout": "sparse50"}}) == 8
    assert format_version({"a": {"bits": 4, "lowrank": {"rank": 16, "bits": 4, "group_size": 128}}}) == 5


def test_lowrank_auto_prices_rank_against_bits(tmp_path):
    """--lowrank auto (cvxq): a layer gets adapters only where they save more distortion than the same bits as
    widths (the allocation's price of a bit); what it spends stays inside the size target; the log says which
    rank each layer got; other methods refuse it."""
    from rdquant.config import from_settings
    from rdquant.lowrank import rank_options
    from rdquant.testing import save_tiny_model_dir

    with pytest.raises(RdquantError, match="--lowrank auto .* needs --method cvxq"):
        from_settings({}, {"lowrank": "auto"}, flags=True)
    with pytest.raises(RdquantError, match="give a number or auto"):
        from_settings({}, {"lowrank": "most"}, flags=True)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(64, 256, generator=g)
    opts = rank_options(W, torch.rand(64, 256, generator=g), rdquant.CompressConfig(method="cvxq", target_bits=3.0), 3)
    assert [o[0] for o in opts] == [16, 16, 16] and all(o[2] > 0 and o[1] == opts[0][1] for o in opts)

    d = save_tiny_model_dir(tmp_path / "wide", "llama", hidden=256, intermediate=512, layers=2)
    cfg = from_settings({}, {"method": "cvxq", "target_bits": 3.25, "lowrank": "auto", "calib_samples": 4,
                             "calib_seqlen": 32, "cvxq_samples": 4, "embed_bits": 16, "clip_search": 5}, flags=True)
    art = rdquant.compress(str(d), cfg, progress=False).save(tmp_path / "a")
    rep = rdquant.inspect(art)
    assert rep.bits_per_weight <= 3.25
    q = json.loads((art / "manifest.json").read_text())["quantized"]
    log = {e["name"]: e for e in json.loads((art / "quant_log.json").read_text())}
    for name, entry in q.items():
        rank = entry.get("lowrank", {}).get("rank", 0)
        assert f"{name.rpartition('.')[2]} rank {rank}" in log[name]["notes"][0]
    assert rep.split_bits()["adapters"] > 0  # this random model's layers take some (a layer's choice is logged)
