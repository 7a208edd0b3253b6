"""The embedding and head as cells of CVXQ's allocation (--embed-bits auto): their distortion weights
(VocabSensitivity) against direct autograd, the width choice, and the config's automatic value."""

import pytest
import torch

from rdquant.config import CompressConfig
from rdquant.methods.cvxq import group_cells
from rdquant.testing import tiny_model
from rdquant.vocab import MIN_BITS, VocabSensitivity, allocated, stored_bytes, vocab_bits


class _Scaled(torch.nn.Embedding):
    """Gemma's kind of embedding: rows times a constant."""

    def __init__(self, emb: torch.nn.Embedding, scale: float = 8.0):
        super().__init__(emb.num_embeddings, emb.embedding_dim)
        self.weight = emb.weight
        self.scale = scale

    def forward(self, ids):
        return super().forward(ids) * self.scale


def _model(tied: bool):
    torch.manual_seed(0)
    return tiny_model("llama", 50, hidden=64, intermediate=128, layers=2, tie_word_embeddings=tied).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_head_weight_is_the_sampled_token_loglik_gradient(tied):
    model = _model(tied)
    cfg = CompressConfig(method="cvxq", target_bits=3, group_size=16)
    vs = VocabSensitivity(model, cfg)
    z = torch.randn(2, 5, 64)
    vs.add_head(z)
    # the same draw, through autograd: d(-log p_y)/dW summed over the batch's positions, squared
    g = torch.Generator().manual_seed(cfg.seed + 1)
    W = model.lm_head.weight.detach().clone().requires_grad_(True)
    logits = z.reshape(-1, 64) @ W.t()
    u = torch.rand(10, 1, generator=g)
    y = torch.searchsorted(torch.softmax(logits.detach(), -1).cumsum(-1), u.contiguous()).clamp(max=49).flatten()
    (G,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y, reduction="sum"), [W])
    want = float(group_cells(W.detach(), G.square(), 16)[0].sum())
    assert vs.head_sum == pytest.approx(want, rel=1e-4)
    dz = torch.softmax(logits.detach(), -1)
    dz[torch.arange(10), y] -= 1
    assert vs.gz_sum == pytest.approx(float((dz @ W.detach()).square().sum()), rel=1e-4)


def test_embedding_weight_adds_token_rows_and_follows_a_scaled_embedding():
    model = _model(False)
    cfg = CompressConfig(method="cvxq", target_bits=3, group_size=16)
    ids = torch.tensor([[3, 7, 3, 9]])
    grad = torch.randn(1, 4, 64)
    vs = VocabSensitivity(model, cfg)
    vs.add_embedding(ids, grad)
    W = model.get_input_embeddings().weight.detach()
    G = torch.zeros_like(W).index_add_(0, ids[0], grad[0])
    assert vs.emb_sum == pytest.approx(float(group_cells(W, G.square(), 16)[0].sum()), rel=1e-6)
    # an embedding that scales its output (Gemma's sqrt(hidden)): the rows' gradient scales with it
    model.model.embed_tokens = _Scaled(model.get_input_embeddings())
    scaled = VocabSensitivity(model, cfg)
    assert scaled.scale == pytest.approx(8.0)
    scaled.add_embedding(ids, grad)
    assert scaled.emb_sum == pytest.approx(64 * vs.emb_sum, rel=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_cells_one_per_stored_matrix_with_exact_rates(tied):
    model = _model(tied)
    cfg = CompressConfig(method="cvxq", target_bits=3, group_size=16)
    vs = VocabSensitivity(model, cfg)
    vs.add_embedding(torch.tensor([[1, 2]]), torch.randn(1, 2, 64))
    vs.add_head(torch.randn(1, 2, 64))
    cells = vs.cells("pca", 16, 7)
    assert [c[0] for c in cells] == (["model.embed_tokens"] if tied else ["model.embed_tokens", "lm_head"])
    for _, w, rate in cells:
        assert w > 0
        assert rate.tolist() == [8.0 * stored_bytes(50, 64, max(b, MIN_BITS), 16) for b in range(8)]
    if tied:  # the tied cell carries both roles
        assert cells[0][1] > vs.emb_sum / vs.emb_steps
    seen = vs.emb_w[[1, 2]]  # per row x group cells: the rows the batch read carry the embedding's weight
    assert bool((seen > 0).all()) and float(vs.emb_w.sum()) == pytest.approx(float(seen.sum()))


def test_auto_width_only_where_an_allocation_chooses():
    assert allocated(CompressConfig(method="cvxq", target_bits=3))
    assert not allocated(CompressConfig(method="cvxq", target_bits=3, embed_bits=8))
    assert not allocated(CompressConfig(method="cvxq", target_bits=3, cvxq_sensitivity="hessian"))
    assert not allocated(CompressConfig(method="gptq"))
    assert vocab_bits(CompressConfig(method="gptq")) == 8
    assert vocab_bits(CompressConfig(method="gptq", embed_bits=4)) == 4
    auto = CompressConfig(method="cvxq", target_bits=3)
    assert vocab_bits(auto, "lm_head", {"lm_head": 5}) == 5 and vocab_bits(auto, "lm_head") == 8


def test_a_scaled_embedding_keeps_its_scale_through_quantization_and_reload(tmp_path):
    import rdquant
    from rdquant.errors import RdquantError

    model = _model(False)
    model.model.embed_tokens = _Scaled(model.get_input_embeddings())
    cfg = CompressConfig(bits=4, group_size=16, embed_bits=8, calib_samples=2, calib_seqlen=16)
    cm = rdquant.compress(model, cfg, calib_ids=torch.randint(0, 50, (2, 16)), progress=False)
    qemb = cm.model.get_input_embeddings()
    ids = torch.tensor([[1, 5, 7]])
    assert qemb.embed_scale == pytest.approx(8.0)
    torch.testing.assert_close(qemb(ids), 8.0 * qemb.dequantized_weight()[ids])
    loaded = rdquant.load(cm.save(tmp_path / "a"))
    assert torch.equal(loaded.get_input_embeddings()(ids), qemb(ids))
    model = _model(False)  # compress quantized the first one in place
    model.model.embed_tokens = type("Shifted", (_Scaled,), {"forward": lambda self, x: _Scaled.forward(self, x) + 1})(
        model.get_input_embeddings())
    with pytest.raises(RdquantError, match="not a scaled row lookup.*--embed-bits 16"):
        rdquant.compress(model, cfg, calib_ids=torch.randint(0, 50, (2, 16)), progress=False)
