"""Would moving outlier input channels into blocks of their own save int8 activations?

For every MatMulNBits of a quantized artifact, on the level-0 run's input to it (the chat prompts
of `llamatrt diff --layerwise`), the relative rms error of the product with the input quantized to
int8 per block of 32 (what accuracy level 4 computes: `llamatrt diff --layerwise` shows the kernel
equals this simulation), and the same with the k channels of largest |x| taken out of their blocks
and kept exact. Such a split is exact for Q4_1 weights (a channel alone in a block keeps its row's
scale and offset) but adds one block of 32 to K per channel moved.

    python benchmarks/outlier_blocks.py ARTIFACT
"""

from __future__ import annotations

import sys

import numpy as np

from llamatrt.tools import quant_layerwise as ql

MOVED = (0, 1, 2, 4, 8, 16)


def split_errors(model, inits, runs) -> dict[str, list[float]]:
    out = {}
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        block = next(a.i for a in node.attribute if a.name == "block_size")
        w = ql._dequantized(node, inits)
        xs = [np.asarray(r[node.input[0]], np.float32).reshape(-1, w.shape[1]) for r in runs]
        order = np.argsort(-np.abs(np.concatenate(xs)).max(0))
        row = []
        for k in MOVED:
            moved, errors = order[:k], []
            for x in xs:
                rest = x.copy()
                rest[:, moved] = 0
                product = ql._block_int8(rest, block) @ w.T + x[:, moved] @ w[:, moved].T
                errors.append(ql._rms(product - x @ w.T) / ql._rms(x @ w.T))
            row.append(max(errors))
        out[node.input[1]] = row
    return out


def main(artifact: str) -> None:
    found: dict[str, list[float]] = {}
    projection_errors = ql.projection_errors

    def measured(model, inits, runs):  # the layerwise run's own inputs, measured both ways
        found.update(split_errors(model, inits, runs))
        return projection_errors(model, inits, runs)

    ql.projection_errors = measured
    ql.run_quant_layerwise(artifact)
    kinds: dict[str, list[list[float]]] = {}
    for name, row in found.items():
        kinds.setdefault(next((k for k in ql.KINDS if f".{k}." in name), "head"), []).append(row)
    print("| projection | " + " | ".join(f"{k} moved" for k in MOVED) + " |")
    print("|---|" + "---|" * len(MOVED))
    for kind, rows in kinds.items():
        print(f"| {kind} | " + " | ".join(f"{v:.2e}" for v in np.mean(rows, 0)) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
