"""The vocabulary matrices in the budget: the token embedding and the output head, quantized after
the decoder blocks (issue 21). The head is solved with GPTQ on the Hessian of its input (the final
norm's output over the calibration windows, which the pipeline has at hand after the last block);
an untied embedding is rounded to its grid (its error does not pass through a Hessian we hold). A
tied pair is one matrix, quantized once for the head, and the embedding looks its rows up from the
same stored tensors (runtime.QuantEmbedding). Grids: symmetric, `embed_bits` wide, row-wise groups
of the run's group size along the hidden size (at 8 bits and groups of 32: llama.cpp's Q8_0).

Their width is `--embed-bits`; with its automatic value (-1) CVXQ's allocation chooses it (each matrix
one cell of the allocation, `VocabSensitivity` measures its distortion weight), other methods take 8.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CompressConfig, LayerLog
from .hessian import HessianAccumulator
from .methods.gptq import gptq_quantize
from .methods.rtn import rtn_quantize
from .models import set_submodule
from .pipeline import layer_log
from .qtensor import QuantizedWeight
from .runtime import QuantEmbedding, QuantLinear

CHUNK_BYTES = 256 << 20  # float32 rows of a vocabulary matrix solved at once (an 8B head is 2 GiB)
DEFAULT_BITS = 8  # --embed-bits auto where no allocation chooses the width
MIN_BITS = 2  # the narrowest width the allocation offers them (a symmetric 1-bit grid is one level)


def allocated(cfg: CompressConfig) -> bool:
    """Whether CVXQ's allocation chooses the vocabulary matrices' width (--embed-bits auto with cvxq
    and a gradient sensitivity; the H-diagonal proxy has no measure for them)."""
    return (cfg.embed_bits == -1 and cfg.method == "cvxq" and cfg.cvxq_sensitivity in ("gradient", "fisher")
            and cfg.grid == "affine")  # a GGUF mix keeps them at their fixed width (8 bits: Q8_0)


def vocab_bits(cfg: CompressConfig, name: str | None = None, widths: dict[str, int] | None = None) -> int:
    """The width matrix `name` is stored at: --embed-bits, else the allocation's choice (`widths`),
    else DEFAULT_BITS (also the stand-in before an allocation has run)."""
    if cfg.embed_bits != -1:
        return cfg.embed_bits
    return int(widths[name]) if widths and name in widths else DEFAULT_BITS


def embedding_scale(emb: nn.Module) -> float:
    """The factor an embedding module multiplies its rows by (Gemma's sqrt(hidden); 1 for nn.Embedding),
    probed on a few rows; an embedding whose output is not a scaled row lookup is refused by name."""
    from .errors import RdquantError

    if type(emb) is nn.Embedding:
        return 1.0
    probe = torch.arange(min(emb.num_embeddings, 64))
    with torch.no_grad():
        w = emb.weight.data[probe].to(torch.float64)
        e = emb(probe.to(emb.weight.device)).detach().to(torch.float64).cpu()
    scale = float((e * w).sum() / (w * w).sum().clamp_min(1e-30))
    if not torch.allclose(e, w * scale, rtol=1e-2, atol=1e-6 * float(w.abs().max())):
        raise RdquantError(f"the token embedding ({type(emb).__name__}) is not a scaled row lookup, so its quantized "
                           "form cannot reproduce it; compress with --embed-bits 16")
    return scale


def check_vocab(model: nn.Module, cfg: CompressConfig) -> None:
    """Refuse, before calibration, an embedding the quantized lookup cannot reproduce (embedding_scale)."""
    emb = vocab_modules(model)[1]
    if cfg.embed_bits != 16 and emb is not None:
        embedding_scale(emb)


def vocab_config(cfg: CompressConfig, bits: int | None = None) -> CompressConfig:
    """GPTQ settings for the vocabulary matrices: the run's solver settings at `bits` (default
    vocab_bits), symmetric; in groups of 32 under `--grid gguf:TYPE` (8 bits: llama.cpp's Q8_0, exported as is)."""
    group = 32 if cfg.grid != "affine" else cfg.group_size if cfg.group_size != 0 else 64
    return CompressConfig(method="gptq", bits=vocab_bits(cfg) if bits is None else bits, group_size=group, symmetric=True,
                          act_order=cfg.act_order, damp_percent=cfg.damp_percent, block_size=cfg.block_size,
                          clip_search=cfg.clip_search, max_shrink=cfg.max_shrink, scale_bits=cfg.scale_bits,
                          device=cfg.device)


def vocab_modules(model: nn.Module) -> tuple[str | None, nn.Module | None, str | None, nn.Module | None, bool]:
    """(embedding name, embedding, head name, head, tied): the head only when it is a plain Linear."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    if not isinstance(emb, nn.Embedding):
        emb = None
    if not isinstance(head, nn.Linear):
        head = None
    tied = emb is not None and head is not None and emb.weight is head.weight
    return (names.get(id(emb)) if emb is not None else None, emb,
            names.get(id(head)) if head is not None else None, head, tied)


def vocab_entries(model: nn.Module, cfg: CompressConfig) -> dict[str, dict]:
    """The manifest entries (`quantized` table) the run will write for the embedding and head at their
    fixed width (vocab_bits), from the shapes alone: a tied pair is the embedding's entry with
    `tied_head`. Empty when they stay 16-bit."""
    if cfg.embed_bits == 16:
        return {}
    emb_name, emb, head_name, head, tied = vocab_modules(model)
    out: dict[str, dict] = {}
    for name, mod, kind in ((head_name, head, "head"), (emb_name, emb, "embedding")):
        if mod is not None and not (tied and kind == "head"):
            vcfg = vocab_config(cfg)
            out[name] = {"layout": "affine", "bits": vcfg.bits, "group_size": vcfg.group_size, "symmetric": True,
                         "shape": list(mod.weight.shape), "kind": kind, **({"tied_head": head_name} if tied and
                                                                            kind == "embedding" else {})}
    return out


def stored_bytes(rows: int, cols: int, bits: int, group_size: int) -> int:
    """Bytes of one quantized vocabulary matrix: packed codes and an fp16 scale per row group."""
    from .packing import packed_nbytes
    from .qtensor import num_groups

    return packed_nbytes(rows * cols, bits) + 2 * rows * num_groups(cols, group_size)


def vocab_stored_bytes(model: nn.Module, cfg: CompressConfig) -> tuple[dict[str, int], int]:
    """({module name: stored bytes}, total) of the quantized embedding and head as `cfg` will store them
    at their fixed width (codes and fp16 scales; a tied pair once, its head at 0); empty when they stay
    16-bit."""
    out: dict[str, int] = {}
    for name, e in vocab_entries(model, cfg).items():
        out[name] = stored_bytes(*e["shape"], e["bits"], e["group_size"])
        if "tied_head" in e:
            out[e["tied_head"]] = 0
    return out, sum(out.values())


def vocab_params(model: nn.Module, cfg: CompressConfig) -> int:
    """Weights of the quantized embedding and head (a tied pair once); 0 when they stay 16-bit."""
    return sum(e["shape"][0] * e["shape"][1] for e in vocab_entries(model, cfg).values())


def _quantize_rows(name: str, weight: torch.Tensor, H: torch.Tensor | None, vcfg: CompressConfig,
                   device: torch.device) -> tuple[QuantizedWeight, LayerLog]:
    """GPTQ against H (plain rounding without it) of a vocabulary matrix, CHUNK_BYTES of rows at a time:
    rows are independent given H, so the result is the whole matrix's while the device holds one chunk
    (and the codes collect on the CPU). Returns the weight and its log line over all rows."""
    rows, cols = weight.shape
    step = max(1, CHUNK_BYTES // (4 * cols))
    codes, scales, log = [], [], None
    for a in range(0, rows, step):
        W = weight[a : a + step].to(device, torch.float32)
        q, notes = gptq_quantize(W, H, vcfg) if H is not None else (rtn_quantize(W, vcfg), ["plain rounding"])
        part = layer_log(name, "gptq" if H is not None else "rtn", q, W, q.dequantize().to(W.device), H, notes)
        codes.append(q.codes.cpu())
        scales.append(q.scales.cpu())
        if log is None:
            log, part.shape, part.weight_mse = part, (rows, cols), part.weight_mse * W.shape[0] / rows
            continue
        log.weight_mse += part.weight_mse * W.shape[0] / rows
        if H is not None:
            log.proxy_error += part.proxy_error
            log.proxy_error_rtn += part.proxy_error_rtn
        log.notes += [n for n in part.notes if n not in log.notes]
        del W, q
    return QuantizedWeight(torch.cat(codes), torch.cat(scales), None, vcfg.bits, vcfg.group_size), log


@torch.no_grad()
def quantize_vocab(model: nn.Module, cfg: CompressConfig, head_inputs: list[torch.Tensor] | None,
                   dtype: torch.dtype, final_norm: nn.Module | None = None,
                   widths: dict[str, int] | None = None) -> list[LayerLog]:
    """Replace the embedding (QuantEmbedding) and the head (QuantLinear, kind "head") of `model` by
    their quantized forms; `head_inputs` are the last block's outputs per batch (None: plain rounding);
    `widths` the allocation's choice per matrix (vocab_bits)."""
    if cfg.embed_bits == 16:
        return []
    device = torch.device(cfg.device)
    emb_name, emb, head_name, head, tied = vocab_modules(model)
    logs: list[LayerLog] = []
    qhead = None
    if head is not None:
        vcfg = vocab_config(cfg, vocab_bits(cfg, emb_name if tied else head_name, widths))
        H = None
        if head_inputs and cfg.method != "rtn":
            acc = HessianAccumulator(head.weight.shape[1], device=device)
            norm = final_norm.to(device) if final_norm is not None else nn.Identity()
            for h in head_inputs:
                acc.add(norm(h.to(device)))
            if final_norm is not None:
                final_norm.to("cpu")
            acc.check_finite(head_name or "the head")
            H = acc.H
        q, log = _quantize_rows(head_name, head.weight.data, H, vcfg, device)
        del H
        bias = head.bias.data if head.bias is not None else None
        qhead = QuantLinear.from_quantized(q, bias, dtype)
        qhead.kind, qhead.solver = "head", log.method
        logs.append(log)
        set_submodule(model, head_name, qhead.to("cpu"))
    if emb is not None:
        if tied and qhead is not None:
            qemb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, qhead.bits, qhead.group_size, qhead.symmetric,
                                  dtype, "cpu", spec=qhead.spec, padding_idx=emb.padding_idx)
            for k in qhead.buffer_names:
                qemb._buffers[k] = qhead._buffers[k]  # one matrix: the very same stored tensors
            qemb.tied_head, qemb.solver = head_name, qhead.solver
            qemb.embed_scale = embedding_scale(emb)
        else:
            q, log = _quantize_rows(emb_name, emb.weight.data, None, vocab_config(cfg, vocab_bits(cfg, emb_name, widths)),
                                    device)
            qemb = QuantEmbedding(emb.num_embeddings, emb.embedding_dim, q.bits, q.group_size, q.symmetric, dtype,
                                  "cpu", spec=q.spec(), padding_idx=emb.padding_idx)
            qemb.set_tensors({k: v.cpu() for k, v in q.packed_state().items()})
            qemb.solver = "rtn"
            qemb.embed_scale = embedding_scale(emb)
            log.notes = []
            logs.append(log)
        set_submodule(model, emb_name, qemb)
    return logs


class VocabSensitivity:
    """The distortion weights of the vocabulary matrices as cells of CVXQ's allocation (--embed-bits
    auto), kept per row x group like a linear's group cells (cvxq.group_cells: n S^2 G^2 per cell, G^2
    the mean squared gradient of the sensitivity objective per calibration batch) and summed into one
    cell per matrix (`cells`).

    The embedding's gradient comes from the linears' own backward pass (its output's gradient, added
    up per token row). The head does not reach the PCA objective (it acts after the final hidden state
    z), so its gradient is that of the log-likelihood of tokens sampled from the model's prediction (the
    fisher objective); under pca it is rescaled by k / E||d loglik/dz||^2, the ratio of the two objectives'
    squared gradients at z (the pca one is k per position: k orthonormal directions with signs +-1).
    A tied pair is one matrix whose cells carry both roles' weights."""

    def __init__(self, model: nn.Module, cfg: CompressConfig) -> None:
        from .qtensor import num_groups

        self.emb_name, self.emb, self.head_name, self.head, self.tied = vocab_modules(model)
        self.cfg, self.group = cfg, vocab_config(cfg).group_size
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # apart from the linears' draws
        cells = lambda m: torch.zeros(m.weight.shape[0], num_groups(m.weight.shape[1], self.group), dtype=torch.float64)
        self.emb_w = cells(self.emb) if self.emb is not None else None  # summed over batches
        self.head_w = cells(self.head) if self.head is not None else None
        self.gz_sum = 0.0
        self.emb_steps = self.head_steps = self.positions = 0
        # an embedding that scales its rows (Gemma): their gradient scales alike
        self.scale = embedding_scale(self.emb) if self.emb is not None else 1.0

    @property
    def emb_sum(self) -> float:
        return float(self.emb_w.sum()) if self.emb_w is not None else 0.0

    @property
    def head_sum(self) -> float:
        return float(self.head_w.sum()) if self.head_w is not None else 0.0

    def _weight(self, W: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        """n S^2 G^2 of every row x group cell [r, n_groups] of rows W [r, d] with gradients G [r, d]."""
        from .methods.cvxq import group_cells

        return group_cells(W, G.square(), self.group)[0].view(W.shape[0], -1).cpu()

    @torch.no_grad()
    def add_embedding(self, ids: torch.Tensor, grad: torch.Tensor) -> None:
        """One batch: `grad` [b, t, d] is the objective's gradient at the embedding's output for `ids` [b, t]."""
        if self.emb is None:
            return
        rows, inv = torch.unique(ids.reshape(-1).cpu(), return_inverse=True)
        g = grad.reshape(-1, grad.shape[-1]).to("cpu", torch.float64)
        G = torch.zeros(rows.numel(), g.shape[1], dtype=torch.float64).index_add_(0, inv, g) * self.scale
        self.emb_w.index_add_(0, rows, self._weight(self.emb.weight.data[rows.to(self.emb.weight.device)].cpu(), G))
        self.emb_steps += 1

    @torch.no_grad()
    def add_head(self, z: torch.Tensor) -> None:
        """One batch of final hidden states z [b, t', d] (after the last norm, at the objective's stride)."""
        if self.head is None:
            return
        W = self.head.weight
        z = z.reshape(-1, z.shape[-1]).to(W.device, W.dtype)
        logits = (z @ W.t()).to(torch.float32)
        if self.head.bias is not None:
            logits += self.head.bias.to(torch.float32)
        from .sensitivity import sample_tokens

        r = torch.softmax(logits, -1)  # d(-log p_y)/d logits = p - e_y, y drawn from p
        del logits  # [positions, vocab] in float32: 0.5 GiB at an 8B head's 1024 positions
        y = sample_tokens(r, self.gen)
        r[torch.arange(r.shape[0], device=r.device), y] -= 1
        self.positions += r.shape[0]
        step = max(1, CHUNK_BYTES // (4 * W.shape[1]))  # rows of W in float32 at a time (an 8B head is 2 GiB)
        zf = z.to(torch.float32)
        gz = torch.zeros_like(zf)  # d(-log p_y)/dz
        for a in range(0, W.shape[0], step):
            Wa = W[a : a + step].detach().float()
            gz += r[:, a : a + step] @ Wa
            self.head_w[a : a + step] += self._weight(Wa, r[:, a : a + step].t() @ zf)
        self.gz_sum += float(gz.square().sum(dtype=torch.float64))
        self.head_steps += 1

    def cells(self, objective: str, components: int, max_bits: int) -> list[tuple[str, float, torch.Tensor]]:
        """(name, distortion weight, stored bits at widths 0..max_bits) per matrix the allocation sets: one
        cell each (a tied pair once, under the embedding's name), symmetric affine at one width, the sum
        of its row x group cells' weights. Widths below MIN_BITS cost what MIN_BITS costs, so the
        allocation never prefers them (vocab widths are clamped to MIN_BITS after it). Row-group cells
        of their own (a width per row x group) measured worse: docs/notes/2026-12-04-embeddings.md."""
        w_emb = self.emb_sum / max(self.emb_steps, 1)
        w_head = self.head_sum / max(self.head_steps, 1)
        if objective == "pca" and self.positions:
            w_head *= components / max(self.gz_sum / self.positions, 1e-30)
        out = []
        for name, mod, w in ((self.emb_name, self.emb, w_emb + (w_head if self.tied else 0.0)),
                             (None if self.tied else self.head_name, self.head, w_head)):
            if name is None or mod is None:
                continue
            rows, cols = mod.weight.shape
            rate = torch.tensor([8.0 * stored_bytes(rows, cols, max(b, MIN_BITS), self.group)
                                 for b in range(max_bits + 1)], dtype=torch.float64)
            out.append((name, w, rate))
        return out
