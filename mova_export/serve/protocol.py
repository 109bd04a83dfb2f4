"""The OpenAI chat-completions protocol as MoVA speaks it: the request schema (pydantic, as FastAPI uses), the one
image and the question taken out of `messages`, OpenAI-style errors, and the response and stream-chunk bodies.

What a request may hold: one user message whose content is text, or parts of `{"type": "text"}` and exactly one
`{"type": "image_url"}` whose URL is a `data:` URL (PNG, JPEG or WebP, base64). MoVA answers one question about one
image with its own fixed prompt, so system messages and earlier turns are refused by name rather than ignored.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.S)


class ApiError(Exception):
    """An error the client gets as OpenAI's `{"error": {...}}` with this HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields MoVA acts on; other OpenAI fields (user, metadata, ...) are accepted and ignored."""
    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None


def parse_request(body: bytes) -> ChatRequest:
    """The request body as a ChatRequest; ApiError 400 naming the first field that is wrong."""
    try:
        return ChatRequest.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "body"
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON ({first['msg']}); send a chat-completions JSON object",
                           code="invalid_json") from None
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None


@dataclass
class Question:
    """What MoVA is asked: the question text and the image's RGB pixels."""
    text: str
    rgb: np.ndarray


def question_of(request: ChatRequest, max_image_pixels: int) -> Question:
    """The question and image of a chat request, or ApiError 400 saying what MoVA cannot answer."""
    for i, m in enumerate(request.messages):
        if m.role in ("system", "developer"):
            raise ApiError(400, f"messages[{i}] is a {m.role} message; MoVA answers with its own fixed prompt: send "
                           "only the user message (question and image)", param=f"messages.{i}.role")
    if len(request.messages) > 1:
        raise ApiError(400, f"{len(request.messages)} messages; MoVA answers one question about one image per "
                       "request: send a single user message (multi-turn chat is not supported)", param="messages")
    message = request.messages[0]
    if message.role != "user":
        raise ApiError(400, f"the message's role is {message.role!r}; send a user message", param="messages.0.role")
    parts = ([ContentPart(type="text", text=message.content)] if isinstance(message.content, str)
             else list(message.content or []))
    images = [p for p in parts if p.type == "image_url"]
    if len(images) != 1:
        raise ApiError(400, f"{'no image' if not images else f'{len(images)} images'} in the message; MoVA answers "
                       "one question about exactly one image: add one image_url part with a data: URL",
                       param="messages.0.content")
    text = "\n".join(p.text for p in parts if p.type == "text" and p.text and p.text.strip()).strip()
    if not text:
        raise ApiError(400, "the message has no question text; add a text part", param="messages.0.content")
    if images[0].image_url is None:
        raise ApiError(400, "the image_url part has no image_url.url", param="messages.0.content")
    return Question(text, decode_data_url(images[0].image_url.url, max_image_pixels))


def decode_data_url(url: str, max_image_pixels: int) -> np.ndarray:
    """HxWx3 uint8 from a base64 data: URL of a PNG, JPEG or WebP; the pixel count is checked from the header,
    before the image is decoded. The server fetches nothing: remote URLs and file paths are refused."""
    from PIL import Image, UnidentifiedImageError

    param = "messages.0.content.image_url.url"
    if not url.startswith("data:"):
        shown = url if len(url) <= 60 else url[:57] + "..."
        raise ApiError(400, f"image_url {shown!r} is not a data: URL; send the image inline as "
                       "data:image/png;base64,... (the server fetches no URL and reads no file)", param=param)
    match = DATA_URL.match(url)
    if match is None:
        raise ApiError(400, "the image's data: URL is not base64 (data:image/png;base64,...); encode the image "
                       "bytes in base64", param=param)
    try:
        raw = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, f"the image's base64 does not decode ({exc}); send the file's bytes base64-encoded",
                       param=param) from None
    try:
        image = Image.open(io.BytesIO(raw))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise ApiError(400, f"the image's {len(raw)} bytes are not a PNG, JPEG or WebP file; send one of those",
                       param=param) from None
    if image.format not in IMAGE_FORMATS:
        raise ApiError(400, f"the image is {image.format}; send PNG, JPEG or WebP", param=param)
    width, height = image.size
    if width * height > max_image_pixels:
        raise ApiError(400, f"the image is {width}x{height} ({width * height / 1e6:.1f} MP), above this server's "
                       f"--max-image-pixels of {max_image_pixels / 1e6:.1f} MP; send a smaller image", param=param)
    try:
        return np.asarray(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:   # a header that parses over truncated pixel data
        raise ApiError(400, f"the image does not decode ({str(exc).splitlines()[0]}); send a complete file",
                       param=param) from None


def max_new_tokens_of(request: ChatRequest, default: int, limit: int) -> int:
    """max_completion_tokens (the current name) or max_tokens, checked; `default` when neither is given."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(request, name)
        if value is not None:
            if not 1 <= value <= limit:
                raise ApiError(400, f"{name}={value}; pass an integer from 1 to {limit}", param=name)
            return value
    return default


def check_choices(request: ChatRequest) -> None:
    """Refuse, rather than silently ignore, the OpenAI features MoVA does not have."""
    if request.n is not None and request.n != 1:
        raise ApiError(400, f"n={request.n}; MoVA returns one choice per request: pass n=1 or leave it out",
                       param="n")
    extra = request.model_extra or {}
    unsupported = {"tools": "tool calls", "functions": "function calls", "logprobs": "logprobs",
                   "top_logprobs": "logprobs", "audio": "audio output"}
    for name, what in unsupported.items():
        if extra.get(name):
            raise ApiError(400, f"{name} is not supported: MoVA answers in text, without {what}; leave it out",
                           param=name)
    fmt = extra.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type", "text") != "text":
        raise ApiError(400, f"response_format {fmt.get('type')!r} is not supported: MoVA answers in plain text; "
                       "leave it out", param="response_format")


# ---- responses ------------------------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def finish_reason(answer: Any, max_new_tokens: int) -> str:
    return "length" if len(answer.token_ids) >= max_new_tokens or answer.cut else "stop"


def usage(answer: Any) -> dict[str, int]:
    n = len(answer.token_ids)
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": n, "total_tokens": answer.prompt_tokens + n}


def mova_field(answer: Any) -> dict[str, Any]:
    """What MoVA adds to each response: the routing and the per-stage timings."""
    return {"experts": answer.experts, "routing_text": answer.routing_text, "routing_mask": answer.routing_mask,
            "token_ids": answer.token_ids, "timings_ms": {k: round(v, 3) for k, v in answer.timings_ms.items()},
            "cache_hits": answer.cache_hits, "cut": answer.cut}


def completion(cid: str, model: str, answer: Any, max_new_tokens: int) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "logprobs": None, "finish_reason": finish_reason(answer, max_new_tokens)}],
            "usage": usage(answer), "mova": mova_field(answer)}


def chunk(cid: str, model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
