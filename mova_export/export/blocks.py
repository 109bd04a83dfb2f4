"""Where in a layered graph a lower precision adds its error, block by block, from one cheap probe.

A full-size tower is probed at a cost of two whole-graph runs per chunk of intermediate tensors (graph_io.
tensor_errors), so ranking every node of a 24-layer ViT or an 18-layer Pix2Struct takes dozens of chunks: an hour
on 2 cores. A transformer's numbered blocks (`/layer.3/`, `/encoder/layers.11/`) meet only at a few tensors (the
residual stream, a mask or position bias), so one probe of the tensors that cross block boundaries says which
blocks add the error; the fp16 repair keeps those blocks in fp32, the INT8 budget ranks only their nodes.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..core.progress import Log, quiet
from .graph_io import tensor_errors

if TYPE_CHECKING:  # pragma: no cover
    import onnx

# A numbered block by its scope: the shortest scope prefix ending in a numbered segment (`layer.3`, `layers_11`).
_BLOCK_SCOPE = re.compile(r"^/((?:[^/]+/)*?[^/]*?[._]\d+)/")
MIN_BLOCKS = 3     # fewer than this is no layered graph: rank its nodes one by one


def block_of(node_name: str) -> str:
    """The numbered block a node belongs to by its scope (`/encoder/layers.11/mlp/fc1/MatMul` -> `encoder/layers.11`),
    "" outside any."""
    match = _BLOCK_SCOPE.match(node_name or "")
    return match.group(1) if match else ""


def ranked(parts: Mapping[str, tuple[Sequence[str], Sequence[str]]], errors: Mapping[str, float]
           ) -> list[tuple[str, float]]:
    """(name, error added) per part of {name: (tensors out, tensors in)}: the largest error out minus the largest in
    (a tensor not probed counts 0: a graph input or a weight). Largest first."""
    def largest(tensors: Sequence[str]) -> float:
        return max((errors.get(t, 0.0) for t in tensors), default=0.0)
    return sorted(((name, largest(outs) - largest(ins)) for name, (outs, ins) in parts.items()),
                  key=lambda item: -item[1])


def block_boundaries(model: "onnx.ModelProto") -> tuple[dict[str, str], dict[str, set[str]], dict[str, set[str]]]:
    """(the block producing each tensor, each block's tensors leaving it, each block's tensors entering it from
    another block); the graph's outputs leave the block producing them."""
    block = {o: block_of(n.name) for n in model.graph.node for o in n.output}
    exits: dict[str, set[str]] = {}
    entries: dict[str, set[str]] = {}
    for n in model.graph.node:
        for t in n.input:
            if t in block and block[t] != block_of(n.name):
                exits.setdefault(block[t], set()).add(t)
                entries.setdefault(block_of(n.name), set()).add(t)
    for t in (o.name for o in model.graph.output):
        exits.setdefault(block.get(t, ""), set()).add(t)
    return block, exits, entries


def block_sensitivity(reference: Path, candidate: Path, feeds: Sequence[Mapping[str, np.ndarray]], log: Log = quiet
                      ) -> list[tuple[str, float]]:
    """Rank the reference graph's blocks (`block_of`; the nodes outside any block are one more, "") by the error the
    candidate adds in each: the largest rel_l2 of the tensors leaving it minus the largest of those entering it, from
    one probe (the first feed) of the tensors that cross block boundaries and both graphs have. Largest first;
    empty when the graph has fewer than MIN_BLOCKS blocks."""
    import onnx

    block, exits, entries = block_boundaries(onnx.load(str(reference), load_external_data=False))
    if len(set(block.values())) < MIN_BLOCKS:
        return []
    cand = onnx.load(str(candidate), load_external_data=False)
    in_both = set(block) & {o for n in cand.graph.node for o in n.output}
    del cand
    leaving = set().union(*exits.values())
    crossing = [t for t in block if t in in_both and t in leaving]
    errors = tensor_errors(reference, candidate, feeds[:1], crossing, budget_bytes=2 << 30, most=256, log=log)
    return ranked({b: (sorted(exits.get(b, ())), sorted(entries.get(b, ()))) for b in set(block.values())}, errors)


def worst_blocks_holding(ranking: Sequence[tuple[str, float]], members: Mapping[str, Sequence[str]], count: int
                         ) -> list[str]:
    """The members (e.g. quantized nodes, by block) of the blocks adding the most error, worst block first, until
    at least `count` are taken."""
    taken: list[str] = []
    for name, gain in ranking:
        if gain <= 0 or len(taken) >= count:
            break
        taken.extend(members.get(name, ()))
    return taken
