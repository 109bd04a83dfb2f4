"""The runtime on the tiny synthetic bundle: answers and routes exactly like the PyTorch reference (ONNX Runtime
fp32, f32 GGUF with an F32 KV cache), the input contract (numpy / PIL / path, RuntimeInputError for bad frames, the
next good frame works), skip-when-K=0, timing fields, streaming, thread safety, expert policies, the `run` CLI."""
from __future__ import annotations

import functools
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from mova_export.errors import BundleError, RuntimeInputError

pytest.importorskip("llama_cpp")

SAMPLES = ("astronaut", "coffee", "chelsea")
MAX_NEW = 8


# ---------------------------------------------------------------------------------------------------------------
# the tiny bundle with an f32 GGUF, built once per session (shared with test_bench.py)

@functools.lru_cache(maxsize=None)
def _runtime_bundle(root: str, base: str) -> tuple[Path, Path]:
    from test_export import _tiny

    from mova_export.bundle import attach_llm

    checkpoint, exported = _tiny(base)
    bundle = Path(root) / "bundle"
    if not bundle.exists():
        shutil.copytree(exported, bundle)  # the export fixture stays as test_export / test_bundle expect it
        attach_llm(bundle, checkpoint, "f32")
    return checkpoint, bundle


def runtime_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, bundle): the tiny export (fp32 + fp16 graphs) plus `llm/model.f32.gguf`."""
    base = tmp_path_factory.getbasetemp()
    return _runtime_bundle(str(base / "tiny-mova-runtime"), str(base / "tiny-mova"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return runtime_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def rt(tiny):
    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle(tiny[1], backend="onnxruntime", llm_f32_kv=True) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def ref(tiny):
    from mova_export.reference import ReferencePipeline

    return ReferencePipeline(tiny[0])


@pytest.fixture(scope="module")
def images():
    from mova_export.samples import sample_images

    return sample_images()


@pytest.fixture(scope="module")
def baseline(rt, images):
    """The chelsea answer with experts A and D forced (the experts' path runs), for the contract tests."""
    return rt.ask(images["chelsea"], "What animal is this?", MAX_NEW, experts=["A", "D"])


# ---------------------------------------------------------------------------------------------------------------
# parity with the reference

@pytest.mark.parametrize("name", SAMPLES)
def test_answers_and_routes_like_the_reference(rt, ref, images, name):
    from mova_export.samples import SAMPLE_QUESTIONS

    question = SAMPLE_QUESTIONS[name]
    got = rt.ask(images[name], question, MAX_NEW)
    want = ref.run(images[name], question, max_new_tokens=MAX_NEW)
    assert got.routing_ids == want.routing_ids and got.routing_text == want.routing_text
    assert got.experts == want.experts and got.routing_mask == want.routing_mask
    assert got.token_ids == want.answer_ids and got.text == want.answer
    assert got.to_json().keys() >= want.to_json().keys()


def test_routed_experts_match_the_reference(rt, ref, images):
    """Forced routing (the random tiny LLM rarely names experts): the experts' path and its tensors match too."""
    from mova_export.validate import parity

    question = "What is in the cup?"
    got = rt.ask(images["coffee"], question, MAX_NEW, experts=["A", "D", "F"], keep_tensors=True)
    want = ref.run(images["coffee"], question, max_new_tokens=MAX_NEW, force_experts=["A", "D", "F"],
                   keep_tensors=True)
    assert got.experts == want.experts == ["A", "D", "F"]
    assert set(got.tensors) == set(want.tensors)
    for key, tensor in want.tensors.items():
        assert parity(tensor, got.tensors[key]).cosine > 0.99999, key
    assert got.token_ids == want.answer_ids and got.text == want.answer


# ---------------------------------------------------------------------------------------------------------------
# input contract

def test_numpy_pil_and_path_give_the_same_answer(rt, images, baseline, tmp_path):
    from PIL import Image

    frame = images["chelsea"]
    path = tmp_path / "chelsea.png"
    Image.fromarray(frame).save(path)
    for image in (Image.fromarray(frame), path, str(path), np.dstack([frame, np.full(frame.shape[:2], 255, np.uint8)])):
        got = rt.ask(image, "What animal is this?", MAX_NEW, experts=["A", "D"])
        assert got.token_ids == baseline.token_ids and got.text == baseline.text


BAD_FRAMES = {
    "none": (None, "What?", "None"),
    "float frame": (np.zeros((32, 32, 3), np.float32), "What?", "dtype float32"),
    "two channels": (np.zeros((32, 32, 2), np.uint8), "What?", "shape"),
    "batch": (np.zeros((2, 32, 32, 3), np.uint8), "What?", "B=1"),
    "empty frame": (np.zeros((0, 32, 3), np.uint8), "What?", "no pixels"),
    "missing file": ("/nonexistent/frame.png", "What?", "does not exist"),
    "list": ([[1, 2, 3]], "What?", "cannot read an image"),
    "empty question": (np.zeros((32, 32, 3), np.uint8), "", "question is empty"),
    "blank question": (np.zeros((32, 32, 3), np.uint8), "   \n", "question is empty"),
    "not a string": (np.zeros((32, 32, 3), np.uint8), 42, "question is a int"),
    "over-long question": (np.zeros((32, 32, 3), np.uint8), "why " * 200, "BERT tokens"),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
def test_bad_frame_raises_and_the_next_frame_works(rt, images, baseline, case):
    image, question, message = BAD_FRAMES[case]
    with pytest.raises(RuntimeInputError, match=message) as info:
        rt.ask(image, question, MAX_NEW)
    assert "\n" not in str(info.value)
    got = rt.ask(images["chelsea"], "What animal is this?", MAX_NEW, experts=["A", "D"])
    assert got.token_ids == baseline.token_ids


@pytest.mark.parametrize("kwargs, message", [({"max_new_tokens": 0}, "max_new_tokens"),
                                             ({"max_new_tokens": 2.5}, "max_new_tokens"),
                                             ({"experts": ["Z"]}, "unknown expert")])
def test_bad_arguments_raise(rt, images, kwargs, message):
    args = {"max_new_tokens": MAX_NEW, **kwargs}
    with pytest.raises(RuntimeInputError, match=message):
        rt.ask(images["coffee"], "What?", args.pop("max_new_tokens"), **args)


# ---------------------------------------------------------------------------------------------------------------
# the two passes

def test_no_expert_skips_the_second_adapter_run(rt, images):
    frame, question = images["astronaut"], "What is the person wearing?"
    got = rt.ask(frame, question, MAX_NEW, experts=[], keep_tensors=True)
    assert got.experts == [] and got.routing_mask == [0] * 7
    assert "adapter_answer" not in got.timings_ms
    assert not [k for k in got.timings_ms if k.startswith("expert_")]
    state = rt.vision.routing_pass(frame, question)  # the routing pass's no-expert tokens
    assert np.array_equal(got.tensors["image_tokens"], state.image_tokens)
    assert np.array_equal(got.tensors["routing_tokens"], state.routing_tokens)
    routed = rt.ask(frame, question, MAX_NEW, experts=["G"], keep_tensors=True)
    assert "adapter_answer" in routed.timings_ms and "expert_G" in routed.timings_ms
    assert not np.array_equal(routed.tensors["image_tokens"], state.image_tokens)


def test_timing_fields_are_present_and_positive(baseline):
    t = baseline.timings_ms
    for stage in ("preprocess", "base", "text_encoder", "adapter_routing", "llm_routing", "expert_A", "expert_D",
                  "adapter_answer", "llm_prefill", "time_to_first_token", "llm_decode", "total"):
        assert stage in t and t[stage] > 0, stage
    assert not [k for k in t if k.startswith("expert_") and k not in ("expert_A", "expert_D")]
    assert t["total"] >= t["time_to_first_token"] >= t["llm_prefill"]
    assert t["total"] >= sum(v for k, v in t.items() if k not in ("total", "time_to_first_token")) * 0.99
    if len(baseline.token_ids) > 1:
        assert baseline.tokens_per_s > 0
    out = baseline.to_json()
    assert set(out) == {"experts", "answer", "routing_text", "routing_mask", "answer_ids", "routing_ids",
                        "timings_ms", "tokens_per_s"}


def test_stream_yields_the_answer_piece_by_piece(rt, images, baseline):
    stream = rt.ask_stream(images["chelsea"], "What animal is this?", MAX_NEW, experts=["A", "D"])
    assert stream.answer is None
    pieces = list(stream)
    assert stream.answer is not None and stream.answer.token_ids == baseline.token_ids
    assert "".join(pieces).strip() == baseline.text


def test_open_stream_holds_the_lock_and_close_releases_it(rt, images, baseline):
    stream = rt.ask_stream(images["chelsea"], "What animal is this?", MAX_NEW, experts=["A", "D"])
    next(stream)
    with pytest.raises(RuntimeInputError, match="unfinished ask_stream"):
        rt.ask(images["chelsea"], "What animal is this?", MAX_NEW)
    stream.close()
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
    assert not errors
    for i, want in enumerate(sequential):
        got = results[i]
        assert (got["experts"], got["answer_ids"], got["routing_ids"]) == \
            (want["experts"], want["answer_ids"], want["routing_ids"])


# ---------------------------------------------------------------------------------------------------------------
# loading, policies, lifecycle

def test_lazy_policy_keeps_at_most_the_cap_and_resident_loads_all(tiny, images):
    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle(tiny[1], backend="onnxruntime", expert_policy="lazy", max_resident_experts=1,
                                 verify=False) as lazy:
        assert not [n for n in lazy.vision.loaded if n.startswith("expert_")]
        got = lazy.ask(images["coffee"], "What is in the cup?", 2, experts=["A", "D"])
        assert got.experts == ["A", "D"] and "load_expert_A" in got.timings_ms
        assert [n for n in lazy.vision.loaded if n.startswith("expert_")] == ["expert_D"]
    assert lazy.closed
    with pytest.raises(RuntimeInputError, match="closed"):
        lazy.ask(images["coffee"], "What is in the cup?", 2)
    with MoVARuntime.from_bundle(tiny[1], backend="onnxruntime", expert_policy="resident", verify=False) as resident:
        assert {f"expert_{c}" for c in "ABCDEFG"} <= set(resident.vision.loaded)
        warm = resident.warmup()
        assert warm.timings_ms["total"] > 0 and not [k for k in warm.timings_ms if k.startswith("load_")]
        info = resident.describe()
        assert info["expert_policy"] == "resident" and len(info["manifest_sha256"]) == 64
        assert all(c["backend"] == "onnxruntime" for c in info["components"].values())


def test_precision_override(tiny, images):
    from mova_export.runtime import MoVARuntime

    with pytest.raises(BundleError, match="no int8 variant"):
        MoVARuntime.from_bundle(tiny[1], backend="onnxruntime", precision="int8", verify=False)
    with MoVARuntime.from_bundle(tiny[1], backend="onnxruntime", precision={"base": "fp16"}, verify=False) as mixed:
        assert mixed.vision.precisions["base"] == "fp16" and mixed.vision.precisions["adapter"] == "fp32"
        assert mixed.ask(images["coffee"], "What is in the cup?", 2).timings_ms["base"] > 0


# ---------------------------------------------------------------------------------------------------------------
# CLI

def test_cli_run_json_matches_reference(tiny, ref, images):
    from click.testing import CliRunner

    from mova_export.cli.run import run

    result = CliRunner().invoke(run, [str(tiny[1]), "--image", "coffee", "--question", "What is in the cup?",
                                      "--json", "--max-new-tokens", str(MAX_NEW), "--backend", "onnxruntime",
                                      "--f32-kv", "--no-verify"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(out) == {"experts", "answer", "routing_text", "routing_mask", "answer_ids", "routing_ids",
                        "timings_ms", "tokens_per_s"}
    want = ref.run(images["coffee"], "What is in the cup?", max_new_tokens=MAX_NEW).to_json()
    for key in ("experts", "answer", "routing_text", "routing_mask", "answer_ids", "routing_ids"):
        assert out[key] == want[key], key


def test_cli_run_stream_and_errors(tiny, tmp_path):
    from click.testing import CliRunner

    from mova_export.cli.run import run

    streamed = CliRunner().invoke(run, [str(tiny[1]), "--image", "chelsea", "--question", "What animal is this?",
                                        "--stream", "--max-new-tokens", "4", "--experts", "A", "--no-verify"])
    assert streamed.exit_code == 0, streamed.output
    assert "experts: A" in streamed.stdout and "tokens/s" in streamed.stdout
    missing = CliRunner().invoke(run, [str(tiny[1]), "--image", str(tmp_path / "nope.png"), "--question", "What?",
                                       "--no-verify"])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: image") and \
        len(missing.stderr.strip().splitlines()) == 1
    empty = CliRunner().invoke(run, [str(tiny[1]), "--image", "coffee", "--question", " ", "--no-verify"])
    assert empty.exit_code == 2 and "question is empty" in empty.stderr


def test_torch_backend_runs_the_reference_modules(tiny, ref, images):
    from mova_export.runtime import MoVARuntime
    from mova_export.validate import parity

    question = "What animal is this?"
    with MoVARuntime.from_bundle(tiny[1], backend="torch", expert_policy="lazy", verify=False) as torch_rt:
        got = torch_rt.ask(images["chelsea"], question, 2, experts=["D"], keep_tensors=True)
        assert set(torch_rt.describe()["components"][n]["backend"] for n in torch_rt.vision.loaded) == {"torch"}
    want = ref.run(images["chelsea"], question, max_new_tokens=2, force_experts=["D"], keep_tensors=True)
    assert parity(want.tensors["image_tokens"], got.tensors["image_tokens"]).cosine > 0.99999
