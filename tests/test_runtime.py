"""The runtime on the tiny synthetic bundle: answers and routes exactly like the PyTorch reference (fp32 graphs in
ONNX Runtime, f32 GGUF with an F32 KV cache), the input contract (numpy / PIL / path, RuntimeInputError for bad
frames before anything runs, the next good frame works), long questions, skip-when-K=0, timing fields, streaming,
thread safety, expert policies, close(), the `run` CLI, and the runtime package without torch or transformers."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import RUNTIME_EXACT
from helpers import cli_error

from mova_export.core.errors import BundleError, RuntimeInputError
from mova_export.core.tolerance import compare_outputs
from mova_export.source.photos import SAMPLE_QUESTIONS, demo_questions
from mova_export.synth.trained import kind_of

pytest.importorskip("llama_cpp")

MAX_NEW = 8
ANSWER_FIELDS = {"experts", "answer", "routing_text", "routing_mask", "answer_ids", "routing_ids", "timings_ms", "cache_hits", "cut",
                 "tokens_per_s"}


@pytest.fixture(scope="module")
def rt(parity_bundle):
    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def baseline(rt, images):
    """The chelsea answer with experts A and D forced (the experts' path runs), for the contract tests; computed
    from the pixels (an earlier test's cached chelsea dropped)."""
    rt.frames.clear()
    return rt.ask(images["chelsea"], "What animal is this?", MAX_NEW, experts=["A", "D"])


def _same_answer(got, want) -> None:
    assert got.routing_ids == want.routing_ids and got.routing_text == want.routing_text
    assert got.experts == want.experts and got.routing_mask == want.routing_mask
    assert got.token_ids == want.token_ids and got.text == want.text


# ---------------------------------------------------------------------------------------------------------------
# parity with the reference

@pytest.mark.parametrize("name, question", demo_questions(), ids=[n for n, _ in demo_questions()])
def test_answers_and_routes_like_the_reference(rt, reference, images, name, question):
    """The tiny trained MoVA routes each demo question to its kind's experts; the fp32 bundle (f32 GGUF, F32 KV)
    routes and answers token for token alike, through the experts and the adapter's routed forms."""
    got = rt.ask(images[name], question, MAX_NEW)
    want = reference.run(images[name], question, max_new_tokens=MAX_NEW)
    assert want.experts == list(kind_of(question).experts)
    _same_answer(got, want)
    assert got.to_json().keys() == want.to_json().keys() == ANSWER_FIELDS


@pytest.mark.parametrize("name, experts", [("coffee", ["A", "C", "G"]), ("chelsea", ["B", "D", "F"]),
                                           ("astronaut", ["E"])])
def test_routed_experts_and_their_tensors_match_the_reference(rt, reference, images, name, experts):
    """Forced routing (the random tiny LLM rarely names experts): every expert graph runs in one of these, and the
    intermediates match the reference's within the fp32 export tolerance."""
    question = SAMPLE_QUESTIONS[name]
    got = rt.ask(images[name], question, MAX_NEW, experts=experts, keep_tensors=True)
    want = reference.run(images[name], question, max_new_tokens=MAX_NEW, force_experts=experts, keep_tensors=True)
    assert got.experts == want.experts == experts
    assert set(got.tensors) == set(want.tensors) == {"base", "text_features", "routing_tokens", "image_tokens",
                                                     *(f"expert_{e}" for e in experts)}
    compare_outputs(want.tensors, got.tensors, component=f"runtime vs reference ({name}, experts {''.join(experts)})")
    _same_answer(got, want)


def _question_of_length(rt, target: int) -> tuple[str, int]:
    """A question of about `target` BERT tokens (the runtime's own tokenizer counts)."""
    from mova_export.core.bert_inputs import text_inputs

    tokenizer = rt.vision._tokenizer
    words = "what colour is the small object on the left side of the table near the window".split()
    question, used = "", 0
    i = 0
    while used < target:
        question += ("" if not question else " ") + words[i % len(words)]
        i += 1
        _, mask = text_inputs(tokenizer, question + "?", rt.facts.text_buckets)
        used = int(mask.sum())
    return question + "?", used


@pytest.mark.parametrize("target, bucket", [(100, 128), (400, 512)])
def test_long_questions_are_answered_like_the_reference(rt, reference, images, target, bucket):
    question, used = _question_of_length(rt, target)
    assert target <= used <= target + 16 and min(b for b in rt.facts.text_buckets if b >= used) == bucket
    # experts routed: the text feature feeds their gates (a request routing none never runs BERT)
    got = rt.ask(images["coffee"], question, MAX_NEW, experts=["B", "D"], keep_tensors=True)
    want = reference.run(images["coffee"], question, max_new_tokens=MAX_NEW, force_experts=["B", "D"],
                         keep_tensors=True)
    compare_outputs({"text_features": want.tensors["text_features"]}, {"text_features": got.tensors["text_features"]},
            component=f"text encoder, {used}-token question")
    _same_answer(got, want)


# ---------------------------------------------------------------------------------------------------------------
# input contract

def test_numpy_pil_and_path_give_the_same_answer(rt, images, baseline, tmp_path):
    from PIL import Image

    frame = images["chelsea"]
    path = tmp_path / "chelsea.png"
    Image.fromarray(frame).save(path)
    rgba = np.dstack([frame, np.full(frame.shape[:2], 255, np.uint8)])
    for image in (Image.fromarray(frame), path, str(path), rgba, np.asfortranarray(frame)):
        got = rt.ask(image, "What animal is this?", MAX_NEW, experts=["A", "D"])
        assert got.token_ids == baseline.token_ids and got.text == baseline.text


BAD_INPUTS = {
    "none": (None, "What?", "None"),
    "float frame": (np.zeros((32, 32, 3), np.float32), "What?", "dtype float32"),
    "two channels": (np.zeros((32, 32, 2), np.uint8), "What?", "shape"),
    "batch": (np.zeros((2, 32, 32, 3), np.uint8), "What?", "B=1"),
    "empty frame": (np.zeros((0, 32, 3), np.uint8), "What?", "no pixels"),
    "one pixel": (np.zeros((1, 1, 3), np.uint8), "What?", "at least 2x2"),
    "missing file": ("/nonexistent/frame.png", "What?", "does not exist"),
    "not an image": ("__text_file__", "What?", "is not an image PIL can read"),
    "list": ([[1, 2, 3]], "What?", "cannot read an image"),
    "empty question": (np.zeros((32, 32, 3), np.uint8), "", "question is empty"),
    "blank question": (np.zeros((32, 32, 3), np.uint8), "   \n", "question is empty"),
    "not a string": (np.zeros((32, 32, 3), np.uint8), 42, "question is a int"),
}


@pytest.fixture()
def spy(rt, monkeypatch):
    """Counts the calls into the vision side and the LLM, to show a refused request never reached them."""
    calls: list[str] = []
    for obj, names in ((rt.vision, ("preprocess", "base", "text", "adapter_routing", "expert", "adapter_answer")),
                       (rt._language, ("encode_prompt", "generate"))):
        for name in names:
            real = getattr(obj, name)
            monkeypatch.setattr(obj, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name),
                                                                                     _real(*a, **k))[1])
    return calls


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_frame_raises_before_anything_runs_and_the_next_frame_works(rt, images, baseline, spy, case, tmp_path):
    image, question, message = BAD_INPUTS[case]
    if isinstance(image, str) and image == "__text_file__":
        image = tmp_path / "notes.png"
        image.write_text("not a picture")
    with pytest.raises(RuntimeInputError, match=message) as info:
        rt.ask(image, question, MAX_NEW)
    assert "\n" not in str(info.value)
    assert spy == [] and not rt._lock.locked() and rt._owner is None
    got = rt.ask(images["chelsea"], "What animal is this?", MAX_NEW, experts=["A", "D"])
    assert got.token_ids == baseline.token_ids and spy


@pytest.mark.parametrize("kwargs, message", [({"max_new_tokens": 0}, "max_new_tokens"),
                                             ({"max_new_tokens": 2.5}, "max_new_tokens"),
                                             ({"max_new_tokens": True}, "max_new_tokens"),
                                             ({"max_new_tokens": 10**6}, "max_new_tokens"),
                                             ({"experts": ["Z"]}, "unknown expert")])
def test_bad_arguments_raise(rt, images, spy, kwargs, message):
    args = {"max_new_tokens": MAX_NEW, **kwargs}
    with pytest.raises(RuntimeInputError, match=message) as info:
        rt.ask_stream(images["coffee"], "What?", args.pop("max_new_tokens"), **args)
    assert "\n" not in str(info.value) and spy == []


# ---------------------------------------------------------------------------------------------------------------
# the two passes

def test_no_expert_skips_the_second_adapter_run(rt, images):
    frame, question = images["astronaut"], "What is the person wearing?"
    got = rt.ask(frame, question, MAX_NEW, experts=[], keep_tensors=True)
    assert got.experts == [] and got.routing_mask == [0] * 7
    assert "adapter_answer" not in got.timings_ms and "experts" not in got.timings_ms
    assert "text_encoder" not in got.timings_ms and "text_features" not in got.tensors   # BERT only feeds the gates
    assert not [k for k in got.timings_ms if k.startswith("expert_")]
    # the routing pass's no-expert tokens, through the same vision runners
    vision, facts = rt.vision, rt.facts
    base = vision.base([a for kind in facts.base.image_inputs for a in vision.preprocess(frame, kind)])
    image_tokens, routing_tokens = vision.adapter_routing(base)
    np.testing.assert_array_equal(got.tensors["image_tokens"], image_tokens)
    np.testing.assert_array_equal(got.tensors["routing_tokens"], routing_tokens)
    routed = rt.ask(frame, question, MAX_NEW, experts=["G"], keep_tensors=True)
    assert "adapter_answer" in routed.timings_ms and "expert_G" in routed.timings_ms
    assert not np.array_equal(routed.tensors["image_tokens"], image_tokens)


def test_timing_fields_are_present_and_positive(baseline):
    from mova_export.runtime import STAGES

    t = baseline.timings_ms
    assert baseline.cache_hits == [] and baseline.cut is None
    for stage in (*STAGES, "expert_A", "expert_D"):
        assert stage in t and t[stage] > 0, stage
    assert not [k for k in t if k.startswith("expert_") and k not in ("expert_A", "expert_D")]
    assert t["experts"] == pytest.approx(t["expert_A"] + t["expert_D"])
    assert t["total"] >= t["time_to_first_token"] >= t["llm_prefill"]
    # BERT and expert preprocessing may run on the overlap thread, beside the main thread's stages
    beside = ("text_encoder", "preprocess")
    assert t["total"] >= sum(v for k, v in t.items() if k not in ("total", "time_to_first_token", "experts", *beside))
    assert t["total"] >= t["text_encoder"] and t["total"] >= t["preprocess"]
    if len(baseline.token_ids) > 1:
        assert baseline.tokens_per_s > 0
    assert set(baseline.to_json()) == ANSWER_FIELDS


def test_stream_yields_the_answer_piece_by_piece(rt, images, baseline):
    stream = rt.ask_stream(images["chelsea"], "What animal is this?", MAX_NEW, experts=["A", "D"])
    assert stream.answer is None
    pieces = list(stream)
    assert stream.answer is not None and stream.answer.token_ids == baseline.token_ids
    assert "".join(pieces).strip() == baseline.text
    with rt.ask_stream(images["chelsea"], "What animal is this?", MAX_NEW, experts=["A", "D"]) as again:
        assert "".join(again).strip() == baseline.text


def test_open_stream_holds_the_lock_and_close_releases_it(rt, images, baseline):
    stream = rt.ask_stream(images["chelsea"], "What animal is this?", MAX_NEW, experts=["A", "D"])
    next(stream)
    with pytest.raises(RuntimeInputError, match="unfinished ask_stream"):
        rt.ask(images["chelsea"], "What animal is this?", MAX_NEW)
    with pytest.raises(RuntimeInputError, match="close the stream first"):
        rt.close()
    stream.close()
    assert not rt.closed and not rt._lock.locked()
    assert rt.ask(images["chelsea"], "What animal is this?", MAX_NEW, experts=["A", "D"]).token_ids == \
        baseline.token_ids


def test_concurrent_asks_are_serialised(rt, images):
    jobs = [("coffee", "What is in the cup?", ["A"]), ("chelsea", "What animal is this?", ["D", "F"]),
            ("astronaut", "What is the person wearing?", [])]
    sequential = [rt.ask(images[n], q, MAX_NEW, experts=e).to_json() for n, q, e in jobs]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            n, q, e = jobs[i]
            results[i] = rt.ask(images[n], q, MAX_NEW, experts=e).to_json()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == len(jobs)
    for i, want in enumerate(sequential):
        got = results[i]
        assert (got["experts"], got["answer_ids"], got["routing_ids"]) == \
            (want["experts"], want["answer_ids"], want["routing_ids"])


# ---------------------------------------------------------------------------------------------------------------
# loading, policies, lifecycle

def _loaded_experts(runtime) -> list[str]:
    return [n for n in runtime.vision.loaded if n.startswith("expert_")]


def test_lazy_policy_keeps_the_least_recently_used_out(parity_bundle, images):
    from mova_export.runtime import MoVARuntime

    frame, question = images["coffee"], "What is in the cup?"
    with MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT, expert_policy="lazy", max_resident_experts=1,
                                 verify=False) as lazy:
        assert _loaded_experts(lazy) == [] and lazy.describe()["max_resident_experts"] == 1
        got = lazy.ask(frame, question, 2, experts=["A", "D"])
        assert got.experts == ["A", "D"] and got.timings_ms["expert_A"] > 0   # created when first routed
        assert _loaded_experts(lazy) == ["expert_D"]
    assert lazy.closed
    with pytest.raises(RuntimeInputError, match="closed"):
        lazy.ask(frame, question, 2)
    lazy.close()   # twice is fine
    with MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT, expert_policy="lazy", max_resident_experts=2, frame_cache_mib=0,
                                 verify=False) as lru:
        for experts, resident in ((["A", "D"], ["expert_A", "expert_D"]), (["C"], ["expert_C", "expert_D"]),
                                  (["D"], ["expert_C", "expert_D"]), (["G"], ["expert_D", "expert_G"])):
            lru.ask(frame, question, 1, experts=experts)
            assert sorted(_loaded_experts(lru)) == resident, experts   # D, used after C, outlives it


def test_resident_policy_loads_every_expert_and_warms_up(parity_bundle):
    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT, expert_policy="resident", verify=False) as resident:
        assert {f"expert_{c}" for c in "ABCDEFG"} <= set(resident.vision.loaded)
        warm = resident.warmup()
        assert warm.timings_ms["total"] > 0 and not [k for k in warm.timings_ms if k.startswith("load_")]
        info = resident.describe()
        assert info["expert_policy"] == "resident" and len(info["manifest_sha256"]) == 64
        assert info["llm"]["qtype"] == "f32" and info["llm"]["f32_kv"] is True
        assert all(g["backend"] == "onnxruntime" and g["precision"] == "fp32" for g in info["graphs"].values())
        assert info["fallbacks"] == {}


def test_precision_and_llm_choice(parity_bundle, images):
    from mova_export.runtime import MoVARuntime

    with pytest.raises(BundleError, match="no fp8 variant of base") as info:
        MoVARuntime.from_bundle(parity_bundle, precision="fp8", verify=False)
    assert "\n" not in str(info.value)
    with pytest.raises(BundleError, match=r"unknown graph\(s\) \['expert_Z'\]"):
        MoVARuntime.from_bundle(parity_bundle, precision={"expert_Z": "fp32"}, verify=False)
    with pytest.raises(BundleError, match="has no q8_0 GGUF; it ships q4_k_m, f32"):
        MoVARuntime.from_bundle(parity_bundle, llm_quant="q8_0", verify=False)
    with pytest.raises(RuntimeInputError, match="unknown backend 'torch'"):
        # the runtime is torch-free by design: the PyTorch side is ReferencePipeline (test_answers_... above)
        MoVARuntime.from_bundle(parity_bundle, backend="torch", verify=False)
    with pytest.raises(RuntimeInputError, match="unknown runtime option"):
        MoVARuntime.from_bundle(parity_bundle, llm_f32_kv=True, verify=False)
    with pytest.raises(RuntimeInputError, match=r"unknown LLM setting\(s\) \['kv'\]"):
        MoVARuntime.from_bundle(parity_bundle, llm={"kv": "f32"}, verify=False)
    # the bundle's defaults are the cpu recipe's: INT8 towers and text encoder, fp32 adapter, the Q4_K_M GGUF
    with MoVARuntime.from_bundle(parity_bundle, precision={"base": "fp32"}, verify=False, vision_threads=1,
                                 llm={"n_threads": 1}) as mixed:
        p = mixed.vision.precisions
        assert p["base"] == "fp32" and p["expert_A"] == p["text_encoder"] == "int8" and p["adapter"] == "fp32"
        assert mixed.describe()["llm"]["qtype"] == "q4_k_m"
        assert mixed.ask(images["coffee"], "What is in the cup?", 2, experts=["A"]).timings_ms["base"] > 0


# ---------------------------------------------------------------------------------------------------------------
# CLI

def test_cli_run_json_matches_reference(parity_bundle, reference, images):
    from click.testing import CliRunner

    from mova_export.cli.run import run

    result = CliRunner().invoke(run, [str(parity_bundle), "--image", "coffee", "--question", "What is in the cup?",
                                      "--json", "--max-new-tokens", str(MAX_NEW), "--backend", "onnxruntime",
                                      "--precision", "fp32", "--llm", "f32", "--f32-kv", "--llm-threads", "1",
                                      "--no-verify"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == ANSWER_FIELDS | {"load_ms", "cold_start"} and out["cold_start"] is True
    want = reference.run(images["coffee"], "What is in the cup?", max_new_tokens=MAX_NEW).to_json()
    for key in ("experts", "answer", "routing_text", "routing_mask", "answer_ids", "routing_ids"):
        assert out[key] == want[key], key
    assert out["timings_ms"]["total"] > 0 and out["load_ms"] > 0


def test_cli_run_stream_and_errors(parity_bundle, tmp_path):
    from click.testing import CliRunner

    from mova_export.cli.run import run

    streamed = CliRunner().invoke(run, [str(parity_bundle), "--image", "chelsea", "--question",
                                        "What animal is this?", "--stream", "--max-new-tokens", "4", "--experts", "a",
                                        "--llm-threads", "1", "--no-verify"])
    assert streamed.exit_code == 0, streamed.output
    assert "experts: A" in streamed.stdout and "tokens/s" in streamed.stdout
    missing = CliRunner().invoke(run, [str(parity_bundle), "--image", str(tmp_path / "nope.png"), "--question",
                                       "What?", "--no-verify"])
    assert cli_error(missing).startswith("error: image") and missing.stderr.startswith("error: image")
    empty = CliRunner().invoke(run, [str(parity_bundle), "--image", "coffee", "--question", " ", "--no-verify"])
    assert "question is empty" in cli_error(empty)
    no_bundle = CliRunner().invoke(run, [str(tmp_path / "nope"), "--image", "coffee", "--question", "What?"])
    assert "bundle folder" in cli_error(no_bundle)


# ---------------------------------------------------------------------------------------------------------------
# the runtime without torch or transformers

TORCH_FREE = textwrap.dedent("""
    import json, sys
    for name in ("torch", "transformers", "torchvision"):
        sys.modules[name] = None          # any import of them now raises ImportError
    from mova_export.runtime import MoVARuntime
    from mova_export.source.photos import sample_images
    bundle, question, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    with MoVARuntime.from_bundle(bundle, **options) as rt:
        answer = rt.ask(sample_images(["coffee"])["coffee"], question, 8, experts=["A", "C"])
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers") and sys.modules[m])
    print(json.dumps({"answer": answer.to_json(), "loaded": loaded}))
""")


def test_runtime_imports_and_answers_without_torch_or_transformers(rt, parity_bundle, images):
    question = "What is in the cup?"
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(parity_bundle), question, json.dumps(RUNTIME_EXACT)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    want = rt.ask(images["coffee"], question, 8, experts=["A", "C"]).to_json()
    for key in ("experts", "answer", "routing_mask", "answer_ids", "routing_ids"):
        assert out["answer"][key] == want[key], key
