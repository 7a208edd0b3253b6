"""Heat map of an artifact's allocation: decoder block x matrix type -> mean code bits per weight, and
all-in bits per weight (codes + side information) per block and matrix, from `rdquant inspect`.

    python bench/bits_heatmap.py bench/cache/artifacts/cvxq_gptq_t3.0g64 --out bench/plots/cvxq_bits_3.0.png
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import rdquant


def grid(path: Path) -> tuple[list[int], list[str], dict[tuple[int, str], tuple[float, float]]]:
    """(blocks, matrix types, (block, type) -> (mean code width, all-in bits/weight))."""
    rep = rdquant.inspect(path)
    cells: dict[tuple[int, str], tuple[float, float]] = {}
    for l in rep.layers:
        m = re.search(r"\.(\d+)\.(?:[^.]+\.)?([^.]+)$", l.name)
        if not m:
            continue
        width = l.mean_width if l.mean_width is not None else float(l.bits)
        cells[(int(m.group(1)), m.group(2))] = (width, l.bits_per_weight)
    blocks = sorted({b for b, _ in cells})
    types = list(dict.fromkeys(t for _, t in sorted(cells, key=lambda k: k[0])))
    return blocks, types, cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--out", type=Path, default=Path("bench/plots/bits_heatmap.png"))
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    blocks, types, cells = grid(args.artifact)
    code = np.array([[cells.get((b, t), (np.nan, np.nan))[0] for b in blocks] for t in types])
    allin = np.array([[cells.get((b, t), (np.nan, np.nan))[1] for b in blocks] for t in types])
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.33 * len(blocks) + 2), 1.0 * len(types) + 3.5))
    for ax, data, label in ((axes[0], code, "mean code bits per weight"), (axes[1], allin, "all-in bits per weight")):
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(types)), types)
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
        ax.set_xlabel("decoder block")
        fig.colorbar(im, ax=ax, label=label)
        for i in range(len(types)):
            for j in range(len(blocks)):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center", fontsize=5, color="w")
    rep = rdquant.inspect(args.artifact)
    axes[0].set_title(args.title or f"{args.artifact.name}: {rep.bits_per_weight:.3f} bits/weight all-in")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    for t, row in zip(types, code):
        print(f"{t:>10}: mean code bits {np.nanmean(row):.2f} (min {np.nanmin(row):.2f}, max {np.nanmax(row):.2f})")


if __name__ == "__main__":
    main()
