"""The latency and parity benchmarks on the tiny bundle: JSON / markdown / PNG with real numbers, the manifest hash
cited, and at fp32 graphs + f32 GGUF (F32 KV cache) 100% routing agreement and equal answers; the `bench` CLI."""
from __future__ import annotations

import json

import pytest
from conftest import RUNTIME_EXACT
from helpers import cli_error

from mova_export.bench import ParityConfig, default_configs, first_divergence
from mova_export.bench.common import stats
from mova_export.bundle import sha256_file
from mova_export.core.errors import RuntimeInputError

pytest.importorskip("llama_cpp")

PNG = b"\x89PNG\r\n\x1a\n"
EXACT = ParityConfig("onnxruntime", "fp32", "f32")


def test_helpers(parity_bundle):
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2
    s = stats([1.0, 2.0, 3.0, 4.0])
    assert s["n"] == 4 and s["p50"] == 2.5 and 3.8 < s["p95"] <= 4.0 and s["min"] == 1.0 and s["max"] == 4.0
    assert stats([]) == {"n": 0}
    assert ParityConfig.parse("onnxruntime:fp32") == ParityConfig("onnxruntime", "fp32", None)
    assert ParityConfig.parse("onnxruntime:fp32:f32") == EXACT
    assert ParityConfig.parse("auto") == ParityConfig("auto", None, None)
    assert ParityConfig.parse("auto:bundle:default") == ParityConfig("auto", None, None)
    with pytest.raises(RuntimeInputError, match="unknown backend 'tflite'"):
        ParityConfig.parse("tflite:int8")
    # the fp32 + f32 bundle: each precision every graph ships (the adapter has no int8) with the most exact GGUF,
    # then the bundle's own plan with each GGUF
    assert default_configs(parity_bundle) == [EXACT, ParityConfig("auto", None, "f32"),
                                              ParityConfig("auto", None, "q4_k_m")]


def test_latency_benchmark_writes_json_markdown_png(parity_bundle, tmp_path):
    from mova_export.bench import latency_benchmark
    from mova_export.runtime import RuntimeOptions

    out = tmp_path / "latency"
    result = latency_benchmark(parity_bundle, runs=2, warmup=0, images=["coffee"], max_new_tokens=4,
                               options=RuntimeOptions(**RUNTIME_EXACT), experts=["A", "D"], out_dir=out)
    assert {p.name for p in out.iterdir()} == {"latency.json", "latency.md", "latency.png"}
    data = json.loads((out / "latency.json").read_text())
    assert data["bundle"]["manifest_sha256"] == sha256_file(parity_bundle / "manifest.json")
    stages = data["stages"]
    for stage in ("preprocess", "base", "text_encoder", "adapter_routing", "llm_routing", "expert_A", "expert_D",
                  "experts", "adapter_answer", "llm_prefill", "time_to_first_token", "llm_decode", "llm_answer",
                  "total"):
        assert stages[stage]["n"] == 2 and 0 < stages[stage]["p50"] <= stages[stage]["p95"], stage
    assert stages["total"]["p50"] >= stages["time_to_first_token"]["p50"]
    assert [r["experts"] for r in data["requests"]] == [["A", "D"]] * 2
    assert set(data["towers"]) == {f"expert_{c}" for c in "ABCDEFG"}
    assert all(t["n"] == 2 and t["p50"] > 0 for t in data["towers"].values())
    assert data["memory"]["peak_rss_mib_runtime"] > 0 and data["load_s"] > 0
    assert data["runtime"]["graphs"]["base"] == {"backend": "onnxruntime", "precision": "fp32",
                                                 "providers": ["CPUExecutionProvider"]}
    assert set(data["reference"]["towers"]) == set(data["towers"])
    assert data["reference"]["stages"]["total"]["n"] == 2
    compared = {row["stage"]: row for row in data["comparison"]}
    assert {"base", "adapter_routing", "llm_routing", "experts", "adapter_answer", "llm_answer", "total"} <= \
        set(compared)
    assert all(row["speedup"] > 0 and row["runtime_p50_ms"] > 0 and row["reference_p50_ms"] > 0
               for row in compared.values())
    markdown = (out / "latency.md").read_text()
    assert data["bundle"]["manifest_sha256"] in markdown and "| llm_prefill |" in markdown
    assert "| expert_G |" in markdown
    assert (out / "latency.png").read_bytes()[:8] == PNG
    assert result["files"] == {"json": str(out / "latency.json"), "markdown": str(out / "latency.md"),
                               "png": str(out / "latency.png")}


def test_parity_benchmark_fp32_is_exact(parity_bundle, tmp_path):
    from mova_export.bench import parity_benchmark

    out = tmp_path / "parity"
    result = parity_benchmark(parity_bundle, images=["astronaut", "coffee", "chelsea"], max_new_tokens=8,
                              out_dir=out, configs=[EXACT], experts=["A", "C", "G"], llm_threads=1)
    assert {p.name for p in out.iterdir()} == {"parity.json", "parity.md", "parity.png"}
    data = json.loads((out / "parity.json").read_text())
    assert data["bundle"]["manifest_sha256"] == sha256_file(parity_bundle / "manifest.json")
    assert data["settings"]["llm_f32_kv"] is True and data["settings"]["forced_experts"] == ["A", "C", "G"]
    (config,) = data["configs"]
    assert config["llm"] == "f32" and config["precision"] == "fp32" and config["fallbacks"] == {}
    assert set(config["graphs"].values()) == {"onnxruntime:fp32"}
    summary = config["summary"]
    assert summary["images"] == 3
    assert summary["routing_agreement"] == 1.0 and summary["answer_exact_match"] == 1.0
    assert summary["routing_ids_equal"] == 1.0 and summary["first_divergence_min"] is None
    assert set(summary["min_cosine"]) == {"base", "text_features", "routing_tokens", "image_tokens", "expert_A",
                                          "expert_C", "expert_G"}
    assert all(c > 0.99999 for c in summary["min_cosine"].values()), summary["min_cosine"]
    rows = config["images"]
    assert [r["image"] for r in rows] == ["astronaut", "coffee", "chelsea"]
    assert all(r["reference_experts"] == r["runtime_experts"] == ["A", "C", "G"] and r["answer_exact"]
               and r["reference_answer"] == r["runtime_answer"] and not r["tensors_on_reference_routing"]
               for r in rows)
    md = (out / "parity.md").read_text()
    assert f"| {EXACT.label} | 100% | 100% | - |" in md and data["bundle"]["manifest_sha256"] in md
    assert (out / "parity.png").read_bytes()[:8] == PNG
    assert result["files"]["json"] == str(out / "parity.json")


def test_cli_bench_commands(parity_bundle, tmp_path):
    from click.testing import CliRunner

    from mova_export.cli.run import bench

    out = tmp_path / "cli"
    latency = CliRunner().invoke(bench, ["latency", str(parity_bundle), "--runs", "1", "--warmup", "0", "--image",
                                         "chelsea", "--max-new-tokens", "2", "--no-reference", "--backend",
                                         "onnxruntime", "--precision", "fp32", "--llm", "f32", "--llm-threads", "1",
                                         "--out", str(out)])
    assert latency.exit_code == 0, latency.output
    assert (out / "latency.json").is_file() and "| total |" in latency.stdout
    assert "reference" not in json.loads((out / "latency.json").read_text())
    parity = CliRunner().invoke(bench, ["parity", str(parity_bundle), "--image", "coffee", "--config",
                                        "onnxruntime:fp32:f32", "--max-new-tokens", "4", "--llm-threads", "1", "--out",
                                        str(out)])
    assert parity.exit_code == 0, parity.output
    assert f"| {EXACT.label} | 100% | 100% |" in parity.stdout and (out / "parity.png").is_file()
    missing = CliRunner().invoke(bench, ["parity", str(tmp_path / "nope"), "--out", str(out)])
    assert cli_error(missing).startswith("error: bundle folder") and missing.stderr.startswith("error: bundle folder")
    bad = CliRunner().invoke(bench, ["parity", str(parity_bundle), "--config", "tflite", "--out", str(out)])
    assert "unknown backend 'tflite'" in cli_error(bad)
