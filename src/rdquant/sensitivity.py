"""Sensitivity of the model's output to noise in each weight, for rate-distortion allocation (CVXQ).

`gradient_sensitivity` is CVXQ's estimate: the output is the final hidden state z_t (after the last
norm), reduced to its top principal directions u_1..u_k (eigh of the calibration covariance, sorted
descending); the sensitivity of weight w is E[sum_{t,i} (d(u_i . z_t)/dw)^2] over calibration
sequences and token positions t at a stride. Instead of one backward pass per (t, i), each sequence
does one backward of sum_{t,i} s_ti u_i . z_t with random signs s_ti = +-1: the square of that gradient
has the same expectation (cross terms vanish), so the cost is one forward + backward per sequence.

With objective `fisher` the same pass backpropagates the log-likelihood of tokens sampled from the
model's own prediction instead, so the squared gradient estimates the diagonal Fisher information:
noise is weighted by what it does to the output distribution (KL), not to the hidden state.

`hessian_sensitivity` is the cheap proxy: every weight of input column j gets E[x_j^2] of the
layer's input (diag of the GPTQ Hessian / 2) divided by the layer's mean output power E[y_r^2], from
forward passes only. Without the division layers are not comparable (a layer whose inputs are small
would get almost no bits); with it every layer's noise counts relative to its own signal.
Both return a dict: module name -> float32 [out, in] (the gradient) or [in] (the proxy).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


def _base(model: nn.Module) -> nn.Module:
    """The model without its LM head (its output's last_hidden_state is the final-norm output)."""
    return getattr(model, "base_model", model)


def _batches(ids: torch.Tensor, batch_size: int):
    for i in range(0, ids.shape[0], batch_size):
        yield ids[i : i + batch_size]


@torch.no_grad()
def principal_directions(model: nn.Module, ids: torch.Tensor, k: int, stride: int, batch_size: int,
                         device: torch.device) -> torch.Tensor:
    """Top-k principal directions [d, k] of the final hidden state over `ids` (descending variance)."""
    return top_directions((_base(model)(x.to(device), use_cache=False).last_hidden_state
                           for x in _batches(ids, batch_size)), k, stride)


@torch.no_grad()
def top_directions(states, k: int, stride: int) -> torch.Tensor:
    """Top-k principal directions [d, k] (descending variance) of final hidden states [b, t, d], taken
    at a stride of positions, from an iterable of batches."""
    cov, n = None, 0
    for z in states:
        z = z[:, ::stride].reshape(-1, z.shape[-1]).to(torch.float64)
        cov = z.t() @ z if cov is None else cov + z.t() @ z
        n += z.shape[0]
    evals, evecs = torch.linalg.eigh(cov / max(n, 1))  # ascending
    return evecs[:, torch.argsort(evals, descending=True)[:k]].to(torch.float32)


def objective_loss(z: torch.Tensor, objective: str, U: torch.Tensor | None, head: nn.Module | None,
                   g: torch.Generator) -> torch.Tensor:
    """The random-sign objective of one batch's strided final hidden states z [b, t', d]: pca, the
    projections on U with random +-1 signs; fisher, the log-likelihood of tokens sampled from the
    head's own prediction. Draws from `g` in the same order whichever pass calls it."""
    if objective == "pca":
        proj = z.to(torch.float32) @ U
        signs = torch.randint(0, 2, proj.shape, generator=g).to(z.device, torch.float32) * 2 - 1
        return (proj * signs).sum()
    logits = head(z).to(torch.float32).reshape(-1, head.out_features)
    with torch.no_grad():
        y = sample_tokens(torch.softmax(logits, -1), g)
    return torch.nn.functional.cross_entropy(logits, y, reduction="sum")


def sample_tokens(probs: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One token per row of `probs` [n, vocab], drawn with `g` (CPU draws, so any device gives the same)."""
    u = torch.rand(probs.shape[0], 1, generator=g).to(probs.device)
    return torch.searchsorted(probs.cumsum(-1), u.contiguous()).clamp(max=probs.shape[1] - 1).flatten()


def _hidden(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def gradient_sensitivity(model: nn.Module, ids: torch.Tensor, names: list[str], components: int = 64,
                         stride: int = 8, batch_size: int = 4, device: str | torch.device = "cpu",
                         seed: int = 0, progress: bool = True, objective: str = "pca",
                         vocab=None) -> dict[str, torch.Tensor]:
    """Mean squared gradient of a random-sign objective w.r.t. each named linear's weight.

    objective `pca` (CVXQ): sum_{t,i} s_ti u_i . z_t over the top principal directions u_i of the final
    hidden state. `fisher`: the log-likelihood of tokens sampled from the model's own prediction at
    each strided position (the squared gradient estimates the diagonal Fisher information, i.e. how
    much the output distribution's KL divergence grows per unit of weight noise). `vocab`
    (vocab.VocabSensitivity) receives each batch's gradient at the embedding output and final states."""
    device = torch.device(device)
    was = {n: p.requires_grad for n, p in model.named_parameters()}
    orig_device = next(model.parameters()).device
    model.to(device).eval()
    try:
        if objective == "pca":
            U = principal_directions(model, ids, min(components, _hidden(model)), stride, batch_size, device)
        for p in model.parameters():
            p.requires_grad_(False)
        params = {n: model.get_submodule(n).weight for n in names}
        for p in params.values():
            p.requires_grad_(True)
        acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        g = torch.Generator(device="cpu").manual_seed(seed)
        steps = 0
        bar = tqdm(list(_batches(ids, batch_size)), desc=f"cvxq sensitivity ({objective} gradients)", unit="batch",
                   disable=not progress)
        emb_out: list[torch.Tensor] = []

        def leaf(module, args, out):  # the embedding's output as a leaf, for its gradient
            emb_out.append(out.detach().requires_grad_(True))
            return emb_out[-1]

        hook = model.get_input_embeddings().register_forward_hook(leaf) if vocab is not None else None
        try:
            for x in bar:
                emb_out.clear()
                z = _base(model)(x.to(device), use_cache=False).last_hidden_state[:, ::stride]
                loss = objective_loss(z, objective, U if objective == "pca" else None, model.get_output_embeddings(), g)
                grads = torch.autograd.grad(loss, list(params.values()) + emb_out[:1])
                for n, gr in zip(params, grads):
                    acc[n].add_(gr.to(torch.float32).square())
                if vocab is not None:
                    vocab.add_embedding(x, grads[-1])
                    vocab.add_head(z.detach())
                steps += 1
        finally:
            if hook is not None:
                hook.remove()
        return {n: (a / max(steps, 1)).cpu() for n, a in acc.items()}
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(was[n])
        model.to(orig_device)


@torch.no_grad()
def hessian_sensitivity(model: nn.Module, ids: torch.Tensor, names: list[str], batch_size: int = 4,
                        device: str | torch.device = "cpu", progress: bool = True) -> dict[str, torch.Tensor]:
    """E[x_j^2] / E[y^2] of each named linear ([in]; the Hessian-diagonal proxy), float model."""
    device = torch.device(device)
    orig_device = next(model.parameters()).device
    model.to(device).eval()
    sums = {n: torch.zeros(model.get_submodule(n).in_features, dtype=torch.float64, device=device) for n in names}
    count = {n: 0 for n in names}
    power = {n: 0.0 for n in names}

    def hook(name):
        def f(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1])
            sums[name] += x.to(torch.float64).square().sum(0)
            count[name] += x.shape[0]
            power[name] += float(out.to(torch.float64).square().mean(-1).sum())
        return f

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        for x in tqdm(list(_batches(ids, batch_size)), desc="cvxq sensitivity (H diag)", unit="batch",
                      disable=not progress):
            _base(model)(x.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.to(orig_device)
    return {n: (sums[n] / max(power[n], 1e-30)).to(torch.float32).cpu() for n in names}


KEEP_BYTES = 8 * 2**30  # the block-wise pass keeps every block's input up to this much (else every k-th)


def final_norm(model: nn.Module) -> nn.Module:
    """The norm after the last block (its output is last_hidden_state), found by the usual names."""
    base = _base(model)
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        mod = getattr(base, name, None)
        if isinstance(mod, nn.Module):
            return mod
    from .errors import RdquantError

    raise RdquantError(f"{type(model).__name__}: found no final norm (norm, ln_f, ...) for the block-wise "
                       "sensitivity pass; load the model in memory instead")


def blockwise_gradient_sensitivity(source, ids: torch.Tensor, skip: tuple[str, ...], components: int = 64,
                                   stride: int = 8, batch_size: int = 4, device: str | torch.device = "cpu",
                                   seed: int = 0, progress: bool = True, objective: str = "pca",
                                   on_block=None, vocab=None) -> None:
    """`gradient_sensitivity` through a block source (source.py), one block in memory at a time.

    A forward pass keeps every block's input for the sensitivity windows (in host memory when the
    device is a GPU); the objective's gradient at the last block's output is taken as in the
    whole-model version (same random draws, same per-batch squaring), then the blocks are walked in
    reverse: each is loaded once more, its forward recomputed from its saved input, and the gradient
    is pushed through it, giving its weights' squared gradients and its input's gradient.
    `on_block(i, block, {layer name: float32 [out, in]})` receives block i's sensitivities while the
    block is loaded (CVXQ reduces them to its cells there), so none are kept for the whole model.
    `vocab` (vocab.VocabSensitivity) receives the gradient at block 0's input and the final states."""
    from .models import block_linears, find_blocks
    from .pipeline import Chunk, _block_output, _nbytes, _park, capture_block_inputs

    device = torch.device(device)
    model = source.model
    blocks_name, blocks = find_blocks(model)
    home = torch.device("cpu") if device.type == "cuda" else device
    chunks = capture_block_inputs(model, blocks, ids, batch_size, device, home)
    n_blocks = len(blocks)
    per = sum(_nbytes(c.hidden) for c in chunks)
    # block inputs kept for the backward: all of them while they take <= KEEP_BYTES, else every k-th
    # (k ~ sqrt(depth)) and each segment recomputed from its first when the backward reaches it
    every = 1 if per * (n_blocks + 1) <= KEEP_BYTES else max(1, math.ceil(math.sqrt(n_blocks)))
    saved = {0: [c.hidden for c in chunks]}

    def forward(i: int, hs: list[torch.Tensor]) -> list[torch.Tensor]:
        block = source.load(i, device)
        with torch.no_grad():
            outs = [_park(_block_output(block, Chunk(h, c.kwargs, c.device)), home) for h, c in zip(hs, chunks)]
        source.release(i)
        return outs

    hs = saved[0]
    for i in tqdm(range(n_blocks), desc=f"cvxq sensitivity ({objective}): forward", unit="block", disable=not progress):
        hs = forward(i, hs)
        if (i + 1) % every == 0 or i + 1 == n_blocks:
            saved[i + 1] = hs
    norm = final_norm(model).to(device)
    head = model.get_output_embeddings().to(device) if objective == "fisher" or vocab is not None else None
    U = None
    if objective == "pca":
        U = top_directions((norm(h.to(device)) for h in saved[n_blocks]), min(components, _hidden(model)), stride)
    g = torch.Generator(device="cpu").manual_seed(seed)
    grads = []
    for h in saved[n_blocks]:
        h = h.to(device).requires_grad_(True)
        loss = objective_loss(norm(h)[:, ::stride], objective, U, head, g)
        (gh,) = torch.autograd.grad(loss, [h])
        grads.append(_park(gh, home))
        if vocab is not None:
            with torch.no_grad():
                vocab.add_head(norm(h)[:, ::stride])
    final_norm(model).to("cpu")
    if head is not None:
        model.get_output_embeddings().to("cpu")
    for i in tqdm(reversed(range(n_blocks)), total=n_blocks, desc=f"cvxq sensitivity ({objective}): backward",
                  unit="block", disable=not progress):
        if i not in saved:  # recompute this segment's block inputs from its kept first one
            a = max(k for k in saved if k <= i)
            for j in range(a, i):
                saved[j + 1] = forward(j, saved[j])
        block = source.load(i, device)
        params = {n: lin.weight for n, lin in block_linears(block, skip).items()}
        was = {n: p.requires_grad for n, p in params.items()}
        acc = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
        new = []
        try:
            for p in params.values():
                p.requires_grad_(True)
            into = i > 0 or vocab is not None  # the gradient at the block's input is wanted
            for k, c in enumerate(chunks):
                x = saved[i][k].to(device).requires_grad_(into)
                with torch.enable_grad():
                    out = block(x, **c.kwargs)
                    out = out[0] if isinstance(out, (tuple, list)) else out
                    wrt = ([x] if into else []) + list(params.values())
                    res = torch.autograd.grad(out, wrt, grad_outputs=grads[k].to(device))
                if i > 0:
                    new.append(_park(res[0], home))
                elif vocab is not None:  # block 0's input is the embedding's output
                    vocab.add_embedding(ids[k * batch_size : (k + 1) * batch_size], res[0])
                for n, gr in zip(params, res[1:] if into else res):
                    acc[n].add_(gr.to(torch.float32).square())
                x = out = res = gr = None  # the last chunk's gradients (a block's worth) are not kept for on_block
            steps = max(len(chunks), 1)
            sens = {f"{blocks_name}.{i}.{n}": a.div_(steps) for n, a in acc.items()}
            if on_block is not None:
                on_block(i, block, sens)
        finally:
            for n, p in params.items():
                p.requires_grad_(was[n])
        del acc, sens
        source.release(i)
        grads = new
        saved.pop(i + 1, None)
