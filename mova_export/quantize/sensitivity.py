"""Which quantized nodes to leave out when a Q/DQ graph misses its budget: scoring (`node_sensitivity`, the error
each node adds, measured) apart from policy (`exclusion_schedule`, how many of the worst to exclude per try), as
ModelOpt's sensitivity package separates them."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..core.progress import Log, quiet
from ..export.blocks import block_of, block_sensitivity, worst_blocks_holding
from ..export.graph_io import tensor_errors
from .select import name_nodes

Feed = Mapping[str, np.ndarray]


def node_sensitivity(fp32: str | Path, qdq: str | Path, feeds: Sequence[Feed], nodes: Sequence[str],
                     pool: int | None = None, log: Log = quiet) -> list[tuple[str, float]]:
    """Rank quantized nodes by the error they add: for node n with activation input x and output y,
    rel_l2(y_q, y_fp32) - rel_l2(x_q, x_fp32) (x is the tensor before its Q/DQ, present in both graphs), each the mean
    over the feeds (graph_io.tensor_errors probes both graphs a few tensors at a time). Largest first. With `pool`, a
    layered graph is ranked coarse to fine: one probe of its block boundaries (export/blocks.py), then only the nodes
    of the worst blocks, at least `pool` of them, are probed (a full-size tower's every node is an hour of probes).
    `qdq` must run in ONNX Runtime (pass simulate_fp8's twin for a float8 graph that does not)."""
    import onnx

    fp32, qdq = Path(fp32), Path(qdq)
    model = onnx.load(str(fp32), load_external_data=False)
    if any(not n.name for n in model.graph.node):
        name_nodes(model)
    by_name = {n.name: n for n in model.graph.node}
    del model
    pairs = [(name, by_name[name].input[0], by_name[name].output[0]) for name in nodes if name in by_name]
    if pool is not None and len(pairs) > pool:
        blocks = block_sensitivity(fp32, qdq, feeds, log)
        if blocks:
            by_block: dict[str, list[str]] = {}
            for name, _, _ in pairs:
                by_block.setdefault(block_of(name), []).append(name)
            keep = set(worst_blocks_holding(blocks, by_block, pool))
            log(f"{qdq.name}: blocks adding the most error {[b for b, _ in blocks[:3]]}; ranking their "
                f"{len(keep)} of {len(pairs)} quantized nodes")
            pairs = [p for p in pairs if p[0] in keep] or pairs
    errors = tensor_errors(fp32, qdq, feeds, list(dict.fromkeys(t for _, x, y in pairs for t in (x, y))), log=log)
    return sorted(((name, errors[y] - errors[x]) for name, x, y in pairs), key=lambda item: -item[1])


def exclusion_schedule(ranked: int, quantized: int, max_excluded: int, tries_left: int) -> list[int]:
    """How many of the most error-adding nodes each further try excludes: 1, 2, 4, ... up to `max_excluded` (and
    the `ranked` nodes there are), never every quantized node, at most `tries_left` tries."""
    out, k = [], 1
    while len(out) < tries_left and k <= min(max_excluded, ranked) and k < quantized:
        out.append(k)
        k *= 2
    return out


def futile_exclusions(first: float, tries: Sequence[tuple[int, float]], most_excluded: int,
                      min_cosine: float) -> str | None:
    """Why the rest of the exclusion tries cannot meet the budget, or None to go on. `first`: the worst held-out
    cosine with every node quantized; `tries`: (nodes excluded, worst cosine) of each exclusion try so far. The best
    gain per excluded node so far, doubled for margin (the schedule doubles the exclusions, and nodes further down
    the ranking add less error), times the most nodes the schedule excludes, must still reach the budget. A first
    exclusion that gained nothing is given one more try (the single worst node may not be where the error is)."""
    per_node = max((cosine - first) / max(excluded, 1) for excluded, cosine in tries)
    if per_node <= 0 and len(tries) < 2:
        return None
    reach = first + 2 * max(per_node, 0.0) * most_excluded
    if reach >= min_cosine:
        return None
    return (f"excluding nodes gained at best {per_node:.2e} cosine per node over {len(tries)} tries; even doubled, "
            f"{most_excluded} excluded nodes would reach {reach:.6f} < {min_cosine}")
