"""A build gives freed memory back: after many large arrays are freed between small live objects (the pattern that
left a full-size build holding 10.9 GB of heap), the process's anonymous RSS is back near where it started; and a
build's ONNX Runtime sessions, whose outputs outlive them, do not leave their arenas behind."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what is tuned")

# What both child processes start with: the memory helpers and their own anonymous RSS.
PRELUDE = textwrap.dedent("""
    import gc, sys
    import numpy as np
    from mova_export.core.memory import release_freed_memory, return_large_blocks_when_freed

    def rss_anon_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
""")

CHILD = PRELUDE + textwrap.dedent("""
    tuned = sys.argv[1] == "tuned"
    if tuned:
        return_large_blocks_when_freed()
    first = np.ones(16 << 20, np.uint8)
    del first                                # freeing a 16 MB mapping raises glibc's dynamic mmap threshold
    before = rss_anon_mib()
    big, small = [], []
    for i in range(300):                     # 2 MB arrays with a small live object after each: a fragmented heap
        big.append(np.ones(2 << 20, np.uint8))
        small.append(bytearray(64 << 10))
    del big
    released = release_freed_memory() if tuned else False
    print(round(rss_anon_mib() - before), released)
""")


# A session's kept output after the session is gone: three 32 MB intermediate tensors, a 4-byte output.
ARENA_CHILD = PRELUDE + textwrap.dedent("""
import onnx
from onnx import helper, TensorProto
from mova_export.runners.ort import OrtRunner

return_large_blocks_when_freed()
n = 8 << 20                                  # 32 MB per intermediate tensor
graph = helper.make_graph(
    [helper.make_node("Mul", ["x", "two"], ["y"]), helper.make_node("Add", ["y", "two"], ["z"]),
     helper.make_node("Mul", ["z", "y"], ["w"]), helper.make_node("ReduceSum", ["w"], ["total"], keepdims=1)],
    "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
    [helper.make_tensor_value_info("total", TensorProto.FLOAT, [1])],
    [helper.make_tensor("two", TensorProto.FLOAT, [1], [2.0])])
path = sys.argv[2]
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
x = np.ones(n, np.float32)
before = rss_anon_mib()
runner = OrtRunner(path, memory_arena=sys.argv[1] == "arena")
kept = runner.infer({"x": x})              # a kept output, as a build keeps its references
del runner
gc.collect()
release_freed_memory()
print(round(rss_anon_mib() - before), float(kept["total"][0]))
""")


def _child(script: str, *args: str) -> list[str]:
    """What a child process running `script` with `args` prints, split."""
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True
                          ).stdout.split()


def _held_mib(mode: str) -> tuple[int, str]:
    held, released = _child(CHILD, mode)
    return int(held), released


def test_freed_large_arrays_go_back_to_the_system():
    held_untuned, _ = _held_mib("untuned")
    held_tuned, _ = _held_mib("tuned")
    # 300 x 2 MB were allocated; 300 x 64 KB (19 MB) stay live
    assert held_untuned > 400                        # glibc keeps the 600 MB of freed arrays in its heap
    assert held_tuned < 60, (held_untuned, held_tuned)


def _held_by_a_kept_output_mib(arena: str, graph_path: str) -> int:
    held, total = _child(ARENA_CHILD, arena, graph_path)
    assert float(total) == 8 * (8 << 20)             # (2x + 2) * 2x = 8 for each of the 8 Mi ones
    return int(held)


def test_a_kept_output_pins_the_arena_of_a_finished_session_unless_it_is_off(tmp_path):
    graph = str(tmp_path / "chain.onnx")
    # ONNX Runtime's numpy outputs wrap arena buffers: the 4-byte output keeps ~100 MB of arena alive
    assert _held_by_a_kept_output_mib("arena", graph) > 60
    assert _held_by_a_kept_output_mib("off", graph) < 30


def test_the_runtime_keeps_an_arena_only_for_a_graph_with_small_outputs():
    from mova_export.bundle import GraphEntry
    from mova_export.core.spec import TensorSpec
    from mova_export.runtime.vision import ARENA_BELOW_BYTES, keeps_arena, output_bytes

    def tower(tokens: int, width: int) -> GraphEntry:
        return GraphEntry("base", "base", "tower", [TensorSpec("pixel_values", (1, 3, 672, 672))],
                          [TensorSpec("features", (1, tokens, width))])

    # MoVA-8B's CLIP at 672 px: a kept arena held its 0.5 GB peak, SAM-H's 4.4 GB; the tiny model's takes KBs
    assert output_bytes(tower(2304, 1024)) == 9 << 20 and not keeps_arena(tower(2304, 1024))
    assert keeps_arena(tower(576, 128))
    text = GraphEntry("text_encoder", "text_encoder", "text", [TensorSpec("input_ids", (1, "text_length"), "int64")],
                      [TensorSpec("hidden", (1, "text_length", 4096))], axes={"text_length": [16, 64]})
    assert output_bytes(text) == 64 * 4096 * 4 == ARENA_BELOW_BYTES       # the longest bucket decides
    assert not keeps_arena(text)
