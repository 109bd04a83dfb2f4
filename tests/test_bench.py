"""The latency and parity benchmarks on the tiny bundle: JSON / markdown / PNG with the expected keys, the manifest
hash cited, and at fp32 (f32 GGUF, F32 KV cache) 100% routing agreement and equal answers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mova_export.bench import first_divergence, parse_config, stats
from mova_export.bundle import sha256_file
from mova_export.errors import RuntimeInputError

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_runtime import runtime_bundle

    return runtime_bundle(tmp_path_factory)


def test_helpers():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    s = stats([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["p50"] == 2.5 and 3.8 < s["p95"] <= 4.0
    assert stats([]) == {"n": 0}
    assert parse_config("onnxruntime:fp32") == {"backend": "onnxruntime", "precision": "fp32"}
    assert parse_config("auto") == {"backend": "auto", "precision": None}
    with pytest.raises(RuntimeInputError, match="unknown backend"):
        parse_config("tflite:int8")


def test_latency_benchmark_writes_json_markdown_png(tiny, tmp_path):
    from mova_export.bench import latency_benchmark

    out = tmp_path / "latency"
    result = latency_benchmark(tiny[1], runs=2, warmup=0, images=["coffee"], max_new_tokens=4,
                               backend="onnxruntime", experts=["A", "D"], out_dir=out)
    files = {p.name for p in out.iterdir()}
    assert files == {"latency.json", "latency.md", "latency.png"}
    data = json.loads((out / "latency.json").read_text())
    assert data["bundle"]["manifest_sha256"] == sha256_file(tiny[1] / "manifest.json")
    stages = data["stages"]
    for stage in ("preprocess", "base", "text_encoder", "adapter_routing", "llm_routing", "expert_A", "expert_D",
                  "experts", "adapter_answer", "llm_prefill", "time_to_first_token", "llm_decode", "total"):
        assert stages[stage]["n"] == 2 and 0 < stages[stage]["p50"] <= stages[stage]["p95"], stage
    assert set(data["towers"]) == {f"expert_{c}" for c in "ABCDEFG"}
    assert data["memory"]["peak_rss_mib_runtime"] > 0
    assert set(data["reference"]["towers"]) == set(data["towers"])
    compared = {row["stage"]: row for row in data["comparison"]}
    assert {"base", "adapter_routing", "llm_routing", "experts", "llm_answer", "total"} <= set(compared)
    assert all(row["speedup"] > 0 for row in compared.values())
    markdown = (out / "latency.md").read_text()
    assert data["bundle"]["manifest_sha256"] in markdown and "| llm_prefill |" in markdown
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["files"]["json"] == str(out / "latency.json")


def test_parity_benchmark_fp32_is_exact(tiny, tmp_path):
    from mova_export.bench import parity_benchmark

    out = tmp_path / "parity"
    result = parity_benchmark(tiny[1], images=["astronaut", "coffee", "chelsea"], max_new_tokens=8, out_dir=out,
                              configs=[{"backend": "onnxruntime", "precision": "fp32"}])
    assert {p.name for p in out.iterdir()} == {"parity.json", "parity.md", "parity.png"}
    data = json.loads((out / "parity.json").read_text())
    assert data["bundle"]["manifest_sha256"] == sha256_file(tiny[1] / "manifest.json")
    (config,) = data["configs"]
    summary = config["summary"]
    assert summary["routing_agreement"] == 1.0 and summary["answer_exact_match"] == 1.0
    assert summary["routing_ids_equal"] == 1.0 and summary["first_divergence_min"] is None
    assert {"base", "text_features", "routing_tokens", "image_tokens"} <= set(summary["min_cosine"])
    assert all(c > 0.99999 for c in summary["min_cosine"].values())
    assert [r["image"] for r in config["images"]] == ["astronaut", "coffee", "chelsea"]
    assert "| onnxruntime:fp32 | 100% |" in (out / "parity.md").read_text()
    assert result["configs"][0]["llm"]["f32_kv"] is True


def test_cli_bench_commands(tiny, tmp_path):
    from click.testing import CliRunner

    from mova_export.cli.run import bench

    out = tmp_path / "cli"
    latency = CliRunner().invoke(bench, ["latency", str(tiny[1]), "--runs", "1", "--warmup", "0", "--image", "chelsea",
                                         "--max-new-tokens", "2", "--no-reference", "--backend", "onnxruntime",
                                         "--out", str(out)])
    assert latency.exit_code == 0, latency.output
    assert (out / "latency.json").is_file() and "| total |" in latency.stdout
    missing = CliRunner().invoke(bench, ["parity", str(tmp_path / "nope"), "--out", str(out)])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: bundle folder")
