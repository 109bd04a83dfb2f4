"""`mova-export serve`: the real app under uvicorn on a free loopback port, spoken to by the official `openai`
client (and httpx where a test needs the raw status and headers), over the tiny trained cpu bundle."""
from __future__ import annotations

import base64
import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import RUNTIME_EXACT
from PIL import Image

from mova_export.source.photos import sample_images

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from mova_export.serve import ServeOptions, create_app  # noqa: E402

MODEL = "mova-tiny"
QUESTIONS = [("chelsea", "What animal is this?"), ("coffee", "How many cups are on the table?"),
             ("astronaut", "Describe the scene in this image."), ("chelsea", "Hello, who are you?")]


def data_url(rgb: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(question: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


class Server:
    """uvicorn serving `app` on a free loopback port in a thread, stopped at exit."""

    def __init__(self, app):
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, key: str = "unused") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics", headers=getattr(self, "auth", {})).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        pattern = rf"^{name}{{{want}}} (\S+)$" if labels else rf"^{name} (\S+)$"
        found = re.search(pattern, text, re.M)
        return float(found.group(1)) if found else 0.0

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def rt(parity_bundle):
    from mova_export.runtime import MoVARuntime

    with MoVARuntime.from_bundle(parity_bundle, **RUNTIME_EXACT) as runtime:
        yield runtime


@pytest.fixture(scope="module")
def frames():
    return sample_images(sorted({name for name, _ in QUESTIONS}))


@pytest.fixture(scope="module")
def expected(rt, frames):
    """What the library answers, request by request (greedy): the server must say the same."""
    return {(name, q): rt.ask(frames[name], q, 24) for name, q in QUESTIONS}


@pytest.fixture(scope="module")
def server(rt):
    s = Server(create_app(ServeOptions(model=MODEL, max_queue=16, max_image_pixels=400_000, max_body_mb=1.0,
                                       warmup=False), runtime=rt))
    yield s
    s.close()


def test_plain_and_streaming_requests_equal_the_library(server, frames, expected):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    for (name, q), want in expected.items():
        got = client.chat.completions.create(model=MODEL, messages=user(q, data_url(frames[name])), max_tokens=24)
        mova = got.model_extra["mova"]
        assert got.choices[0].message.content == want.text
        assert mova["token_ids"] == want.token_ids and mova["experts"] == want.experts
        assert got.usage.completion_tokens == len(want.token_ids) and got.usage.prompt_tokens > 576
        assert got.choices[0].finish_reason == ("length" if len(want.token_ids) == 24 else "stop")

        pieces, last, usage = [], None, None
        for chunk in client.chat.completions.create(model=MODEL, messages=user(q, data_url(frames[name])),
                                                    max_completion_tokens=24, stream=True,
                                                    stream_options={"include_usage": True}):
            if not chunk.choices:
                usage = chunk.usage
                continue
            pieces.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                last = chunk.model_extra["mova"]
        assert "".join(pieces).strip() == want.text
        assert last["token_ids"] == want.token_ids and last["experts"] == want.experts
        assert usage.completion_tokens == len(want.token_ids)


def test_eight_concurrent_clients_get_the_sequential_answers(server, frames, expected):
    jobs = [QUESTIONS[i % len(QUESTIONS)] for i in range(8)]

    def ask(job):
        name, q = job
        got = server.client().chat.completions.create(model=MODEL, messages=user(q, data_url(frames[name])),
                                                       max_tokens=24)
        return got.model_extra["mova"]["token_ids"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [expected[job].token_ids for job in jobs]


def test_sampling_is_seeded_and_greedy_at_temperature_zero(server, frames, expected):
    client = server.client()
    name, q = QUESTIONS[0]
    messages = user(q, data_url(frames[name]))

    def ids(**kw):
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                              **kw).model_extra["mova"]["token_ids"]

    assert ids(temperature=0) == expected[(name, q)].token_ids[:16]
    assert ids(temperature=2.0, seed=7) == ids(temperature=2.0, seed=7)
    assert len({tuple(ids(temperature=2.0, seed=s)) for s in range(4)}) > 1


BAD = [  # (what is wrong, request changes, status, words the message must hold)
    ("no image", {"messages": [{"role": "user", "content": "What is this?"}]}, 400, "no image"),
    ("two images", "two", 400, "2 images"),
    ("remote url", {"url": "https://example.com/cat.png"}, 400, "is not a data: URL"),
    ("local path", {"url": "/etc/passwd"}, 400, "reads no file"),
    ("bad base64", {"url": "data:image/png;base64,@@@not-base64"}, 400, "base64 does not decode"),
    ("not an image", {"url": "data:image/png;base64," + base64.b64encode(b"hello world").decode()}, 400,
     "are not a PNG, JPEG or WebP"),
    ("too many pixels", {"pixels": (800, 600)}, 400, "above this server's --max-image-pixels"),
    ("body too large", {"body_mb": 1.5}, 413, "--max-body-mb"),
    ("unknown model", {"model": "gpt-4o"}, 404, "is not served here"),
    ("n > 1", {"n": 2}, 400, "n=2"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools is not supported"),
    ("json mode", {"response_format": {"type": "json_object"}}, 400, "response_format 'json_object'"),
    ("zero tokens", {"max_tokens": 0}, 400, "max_tokens=0"),
    ("too many tokens", {"max_completion_tokens": 10**6}, 400, "max_completion_tokens=1000000"),
    ("hot temperature", {"temperature": 5}, 400, "temperature=5"),
    ("system message", "system", 400, "system message"),
    ("not json", "not json", 400, "not valid JSON"),
    ("missing messages", {"messages": None}, 400, "messages"),
]


@pytest.mark.parametrize("what,change,status,words", BAD, ids=[b[0] for b in BAD])
def test_a_bad_request_gets_its_status_and_message_and_the_server_stays_up(server, frames, expected, what, change,
                                                                          status, words):
    name, q = QUESTIONS[0]
    url = data_url(frames[name])
    body: dict = {"model": MODEL, "messages": user(q, url), "max_tokens": 8}
    content = None
    if change == "two":
        body["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": url}})
    elif change == "system":
        body["messages"] = [{"role": "system", "content": "Be brief."}, *body["messages"]]
    elif change == "not json":
        content = b"{not json"
    elif "url" in change:
        body["messages"][0]["content"][1]["image_url"]["url"] = change["url"]
    elif "pixels" in change:
        big = np.zeros((change["pixels"][1], change["pixels"][0], 3), np.uint8)
        body["messages"][0]["content"][1]["image_url"]["url"] = data_url(big)
    elif "body_mb" in change:
        body["padding"] = "x" * int(change["body_mb"] * 2**20)
    else:
        body.update(change)
        body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(server.url + "/v1/chat/completions", json=None if content else body, content=content,
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and "Traceback" not in r.text and "\n" not in error["message"]
    good = server.client().chat.completions.create(model=MODEL, messages=user(q, url), max_tokens=4)
    assert good.model_extra["mova"]["token_ids"] == expected[(name, q)].token_ids[:4]


def test_a_client_that_leaves_mid_stream_frees_the_server(server, rt, frames, expected):
    name, q = QUESTIONS[0]
    never_stop = {str(t): -100 for t in rt.llm.stop_ids}    # OpenAI's logit_bias: an answer that runs on
    body = {"model": MODEL, "messages": user(q, data_url(frames[name])), "stream": True, "max_tokens": 1000,
            "logit_bias": never_stop}
    tokens_before = server.metric("mova_completion_tokens_total")
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break                                # the first real piece: leave
    start = time.perf_counter()
    good = server.client().chat.completions.create(model=MODEL, messages=user(q, data_url(frames[name])),
                                                   max_tokens=24)
    waited = time.perf_counter() - start
    assert good.model_extra["mova"]["token_ids"] == expected[(name, q)].token_ids
    deadline = time.monotonic() + 10
    while server.metric("mova_cut_requests_total", reason="cancelled") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("mova_cut_requests_total", reason="cancelled") >= 1
    abandoned = server.metric("mova_completion_tokens_total") - tokens_before - len(expected[(name, q)].token_ids)
    assert abandoned < 100, f"the abandoned request ran on for {abandoned} tokens"
    assert waited < 30


def test_a_full_queue_answers_429_with_retry_after(rt, frames):
    s = Server(create_app(ServeOptions(model=MODEL, max_queue=1, warmup=False), runtime=rt))
    try:
        name, q = QUESTIONS[2]
        body = {"model": MODEL, "messages": user(q, data_url(frames[name])), "max_tokens": 24}
        with ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(lambda _: httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120),
                                    range(5)))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(200) >= 2 and 429 in codes and set(codes) <= {200, 429}
        refused = next(r for r in replies if r.status_code == 429)
        assert int(refused.headers["Retry-After"]) >= 1 and "--max-queue 1" in refused.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):        # the openai client sees it as a rate limit
            with ThreadPoolExecutor(5) as pool:
                list(pool.map(lambda _: s.client().chat.completions.create(model=MODEL, messages=body["messages"],
                                                                           max_tokens=24), range(5)))
        assert httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120).status_code == 200
    finally:
        s.close()


def test_health_waits_for_the_load_and_metrics_count(rt, frames):
    loaded = threading.Event()

    def loader():
        loaded.wait(30)
        return rt

    s = Server(create_app(ServeOptions(model=MODEL, api_key="k3y", warmup=False), loader=loader))
    s.auth = {"Authorization": "Bearer k3y"}
    try:
        assert httpx.get(s.url + "/health").status_code == 503
        name, q = QUESTIONS[1]
        early = httpx.post(s.url + "/v1/chat/completions", headers=s.auth, timeout=30,
                           json={"model": MODEL, "messages": user(q, data_url(frames[name]))})
        assert early.status_code == 503 and "still loading" in early.json()["error"]["message"]
        loaded.set()
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").chat.completions.create(model=MODEL, messages=user(q, data_url(frames[name])))
        assert httpx.get(s.url + "/metrics").status_code == 401
        ok_before = s.metric("mova_requests_total", status="200")
        answer = s.client("k3y").chat.completions.create(model=MODEL, messages=user(q, data_url(frames[name])),
                                                         max_tokens=8)
        experts = answer.model_extra["mova"]["experts"]
        assert experts, "the counting question routes to an expert"
        time.sleep(0.2)
        assert s.metric("mova_requests_total", status="200") == ok_before + 1
        assert s.metric("mova_requests_total", status="401") == 1
        assert s.metric("mova_routed_expert_total", expert=experts[0]) >= 1
        assert s.metric("mova_stage_seconds_count", stage="llm_routing") >= 1
        assert s.metric("mova_time_to_first_token_seconds_count") >= 1
    finally:
        s.close()


def test_serve_command_refuses_a_missing_bundle_and_a_taken_port(tmp_path, parity_bundle):
    import socket

    from mova_export.cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output and "Traceback" not in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(parity_bundle), "--port", str(port)])
    assert result.exit_code == 2 and f"127.0.0.1:{port} is in use; pass another --port" in result.output


def test_a_missing_extra_is_named_in_one_line(capsys):
    from mova_export.cli.common import one_line_errors

    @one_line_errors
    def needs_fastapi():
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")

    with pytest.raises(SystemExit) as code:
        needs_fastapi()
    assert code.value.code == 2
    assert capsys.readouterr().err == ("error: this command needs the `serve` extra (No module named 'fastapi'); "
                                       "install it with pip install 'mova-export[serve]'\n")
