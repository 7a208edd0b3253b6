"""Memory and time of CVXQ's bit allocation alone at a real model's cell count, without the model.

cvxq.allocate runs on synthetic cells with the shapes of a Llama model's linears (row-cluster cells of 128
rows x one column, the default; random distortion weights) plus one cell each for the embedding and the
head, at the target's budget. On the CPU, rdquant.testing.LiveBytes gives the peak of all tensors alive at
once above the inputs, and the part from allocate.Cells on (what a GPU run holds on the device: the cells'
arrays, their float64 weights and the passes over them; the rate tables it is built from stay in host memory;
older trees without Cells count everything as device-side, which is what they moved there). On a GPU the peak
is CUDA's allocator statistic above the inputs. A hash of the widths checks that a change keeps them.

  python bench/alloc_memory.py --shape 8b --layers 32
  python bench/alloc_memory.py --shape 8b --layers 32 --device cuda
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import torch

from rdquant.config import CompressConfig
from rdquant.testing import LiveBytes

from scale import SHAPES  # bench/ is on sys.path (run as a script, or by the tests)


def synthetic_cells(shape: str, layers: int, cfg: CompressConfig, seed: int = 0):
    """(LayerInfo list, {name: (weights, rates, clusters)}, vocabulary cells, quantized weights) for `layers`
    blocks of `shape`: what cvxq.layer_cells and VocabSensitivity.cells hand the allocation."""
    from rdquant.methods.cvxq import LayerInfo, group_rates
    from rdquant.qmixed import width_bits
    from rdquant.vocab import stored_bytes

    c = SHAPES[shape]
    hidden, mlp, heads, kv, vocab = (c["hidden_size"], c["intermediate_size"], c["num_attention_heads"],
                                     c["num_key_value_heads"], c["vocab_size"])
    kvw = hidden // heads * kv
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kvw, hidden),
              "self_attn.v_proj": (kvw, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)}
    mb, size = cfg.cvxq_max_bits, cfg.group_size
    rates, clusters = {}, {}
    for k, (r, c) in shapes.items():  # shared by every block: the same sizes, hence the same rates
        n_c = -(-r // size)
        sizes = torch.full((n_c,), float(size), dtype=torch.float64)
        sizes[-1] = r - size * (n_c - 1)
        rates[k] = group_rates(sizes.repeat_interleave(c), mb, width_bits(mb), None, cfg.cvxq_grid == "uniform").to(torch.float32)
        clusters[k] = (torch.arange(r) // size).to(torch.int16)
    g = torch.Generator().manual_seed(seed)
    infos, cells = [], {}
    for i in range(layers):
        for k, (r, c) in shapes.items():
            name = f"model.layers.{i}.{k}"
            infos.append(LayerInfo(name, r, c, False))
            cells[name] = (torch.rand(rates[k].shape[0], generator=g, dtype=torch.float64) ** 4, rates[k], clusters[k])
    vr = torch.tensor([8.0 * stored_bytes(vocab, hidden, max(b, 2), 128) for b in range(mb + 1)], dtype=torch.float64)
    total = sum(float(c[0].sum()) for c in cells.values())
    vcells = [("model.embed_tokens", total * 0.002, vr), ("lm_head", total * 0.02, vr)]
    n = sum(r * c for r, c in shapes.values()) * layers + 2 * vocab * hidden
    return infos, cells, vcells, n


def measure(shape: str, layers: int, target: float, device: str = "cpu", seed: int = 0) -> dict:
    from rdquant import allocate
    from rdquant.methods import cvxq

    cfg = CompressConfig(method="cvxq", target_bits=target, group_size=128, device=device)
    infos, cells, vcells, n = synthetic_cells(shape, layers, cfg, seed)
    n_cells = sum(c[0].numel() for c in cells.values()) + len(vcells)
    mark: dict[str, int] = {}
    live = LiveBytes() if device == "cpu" else None
    init = getattr(allocate, "Cells", None) and allocate.Cells.__init__  # (older trees: no Cells, no split)

    keep = []

    def entered(self, weight, rate, *a, **k):  # from here on the arrays are the device's
        if live is not None:
            keep.append(rate)  # the host table stays counted, so its release hides no device-side growth
            mark["host"], mark["peak"] = live.live, live.peak
            mark["weights"] = weight.numel() * 8  # on a GPU the float64 weights are copied there; here they are not
            live.peak = live.live
        return init(self, weight, rate, *a, **k)

    if init:
        allocate.Cells.__init__ = entered
    try:
        if live is not None:
            with live:
                for c in cells.values():
                    for t in c:
                        t.view_as(t)  # the inputs count from here: the peak is above them
                base = live.live
                t0 = time.perf_counter()
                widths, total, _, vw = cvxq.allocate(None, infos, None, cfg, target * n, False, cells, vcells, [])
                seconds = time.perf_counter() - t0
            device_part = live.peak - mark.get("host", base) + mark.get("weights", 0)
            peak = max(live.peak, mark.get("peak", 0)) - base
        else:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            widths, total, _, vw = cvxq.allocate(None, infos, None, cfg, target * n, False, cells, vcells, [])
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            peak = device_part = torch.cuda.max_memory_allocated() - base
    finally:
        if init:
            allocate.Cells.__init__ = init
    h = hashlib.sha256()
    for k in sorted(widths):
        h.update(widths[k].numpy().tobytes())
    return {"shape": shape, "layers": layers, "target_bits": target, "device": device, "cells": n_cells,
            "seconds": round(seconds, 2), "peak_gib": round(peak / 2**30, 3),
            "device_part_gib": round(device_part / 2**30, 3), "bytes_per_cell": round(device_part / n_cells, 1),
            "bits_per_weight": round(total / n, 4), "vocab_widths": vw, "widths_sha256": h.hexdigest()[:16]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--target-bits", type=float, default=4.25)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    row = measure(args.shape, args.layers, args.target_bits, args.device)
    print(json.dumps(row))
    print(f"\n{'cells':>12} {'s':>8} {'peak GiB':>9} {'from Cells on GiB':>18} {'B/cell':>7}  widths")
    print(f"{row['cells']:>12,} {row['seconds']:>8.2f} {row['peak_gib']:>9.3f} {row['device_part_gib']:>18.3f} "
          f"{row['bytes_per_cell']:>7.1f}  {row['widths_sha256']}")
    if args.json:
        rows = json.loads(args.json.read_text()) if args.json.exists() else []
        args.json.write_text(json.dumps(rows + [row], indent=1))


if __name__ == "__main__":
    main()
