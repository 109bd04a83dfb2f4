"""MoVA's prompts, chat frame, `<image>` tokenization and routing-letter parsing, verbatim from upstream.

Pure Python (no torch): the device runtime uses it too. The model pool of the routing prompt is the registered
experts' (letter, router text) lines (`components.routing_prompt_lines()` on the build side); a bundle carries the
finished prompt text, so the runtime needs no registry.
"""
from __future__ import annotations

from typing import Callable, Sequence

IMAGE_TOKEN_INDEX = -200  # upstream `IMAGE_TOKEN_INDEX`: where image embeddings are spliced into the prompt

ROUTER_INTRO = (
    "You are a helpful assistant router. Based on the visual content, questions, and model pool the user provides, "
    "you need to consider the expertise of these models to select the most 3 suitable models to help you answer the "
    "questions. Answer with the model's letter from the given choices directly. If no models are selected, just "
    "answer 'none'.\nModel pool:"
)


def routing_prompt(pool: Sequence[tuple[str, str]]) -> str:
    """mova/constants.py ROUTING_PROMPT for a model pool of (letter, description) lines in routing order."""
    return ROUTER_INTRO + "".join(f"\n{letter}. {text}" for letter, text in pool) + "\n\nQuestion:\n"


# conv_mova_llama3 (SeparatorStyle.MPT): system + sep, then role + message + sep, then the open assistant role.
SYSTEM = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
    "assistant. You are able to understand the visual content that the user provides, and assist the user with a "
    "variety of tasks using natural language."
)
SEP = "<|eot_id|>"
USER_ROLE = "<|start_header_id|>user<|end_header_id|>\n\n"
ASSISTANT_ROLE = "<|start_header_id|>assistant<|end_header_id|>\n\n"
IMAGE_PLACEHOLDER = "<image>"
IM_START, IM_END = "<im_start>", "<im_end>"
STOP_TOKEN = "<|eot_id|>"  # load_pretrained_model sets eos to <|eot_id|> for mova-8b
MAX_ROUTING_TOKENS = 16


def chat_prompt(question: str, *, routing_prompt: str | None = None, use_im_start_end: bool = False) -> str:
    """The full prompt string of the routing pass (with the routing prompt text) or of the answer pass (None)."""
    image = f"{IM_START}{IMAGE_PLACEHOLDER}{IM_END}" if use_im_start_end else IMAGE_PLACEHOLDER
    body = question if routing_prompt is None else routing_prompt + question
    return SYSTEM + SEP + USER_ROLE + image + "\n" + body + SEP + ASSISTANT_ROLE


def adapter_text(question: str) -> str:
    """What the MoV-Adapter's BERT reads: the user question only, lower-cased, framed as upstream does."""
    cleaned = question.replace("<image>\n", "").lower()
    return f"question 0: {cleaned}\n\n"


def tokenize_with_image(prompt: str, encode: Callable[[str], Sequence[int]], bos_token_id: int | None,
                        image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """Upstream `tokenizer_image_token`: tokenize the chunks around `<image>` and join them with the image index.

    `encode(text)` must behave like `tokenizer(text).input_ids` (with BOS if the tokenizer adds one). Like
    upstream, when the first chunk starts with BOS, one BOS is kept up front and every chunk loses its first id;
    since the system string itself starts with `<|begin_of_text|>`, a BOS-adding tokenizer yields two BOS ids.
    """
    chunks = [list(encode(chunk)) for chunk in prompt.split(IMAGE_PLACEHOLDER)]
    ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and bos_token_id is not None and chunks[0][0] == bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(image_token_index)  # upstream's separator [idx] * (offset + 1), sliced [offset:]
        ids.extend(chunk[offset:])
    return ids


def parse_routing(response: str, letters: Sequence[str]) -> list[int]:
    """Upstream `get_routing_weights`: first three comma segments, then an uppercase substring test per letter."""
    kept = ",".join(response.split(",")[:3])
    return [1 if letter in kept else 0 for letter in letters]


def routed_letters(mask: Sequence[int], letters: Sequence[str]) -> list[str]:
    return [letter for letter, bit in zip(letters, mask) if bit]


def mask_label(mask: Sequence[int], letters: Sequence[str]) -> str:
    """"ACG" for a mask, "none" when empty (sample labels, tables)."""
    return "".join(routed_letters(mask, letters)) or "none"
