"""MoVA's prompts, chat frame, `<image>` tokenization and routing-letter parsing, verbatim from upstream.

Pure Python (no torch): the runtime uses it too.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .config import EXPERT_LETTERS, IMAGE_TOKEN_INDEX

_ROUTER_INTRO = (
    "You are a helpful assistant router. Based on the visual content, questions, and model pool the user provides, "
    "you need to consider the expertise of these models to select the most 3 suitable models to help you answer the "
    "questions. Answer with the model's letter from the given choices directly. If no models are selected, just "
    "answer 'none'.\nModel pool:"
)
_EXPERT_DESCRIPTIONS = (
    "This model can effectively extract the accurate spatial and semantic information from natural images.",
    "This model can handle images with text accurately and efficiently but fails to process natural images.",
    "This model is a state-of-the-art object detector that can identify objects in images.",
    "This model shows remarkable skill in text recognition, attaining top-tier text analysis outcomes across diverse "
    "areas",
    "This model is a specialized model designed to achieve state-of-the-art plot and chart understanding performance.",
    "This model is a foundation model designed for biomedical vision-language processing.",
    "This model is a leading image segmentation framework and achieves strong zero-shot segmentation performance.",
)
# mova/constants.py ROUTING_PROMPT, in code letter order.
ROUTING_PROMPT = (
    _ROUTER_INTRO
    + "".join(f"\n{letter}. {text}" for letter, text in zip(EXPERT_LETTERS, _EXPERT_DESCRIPTIONS))
    + "\n\nQuestion:\n"
)

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


def chat_prompt(question: str, *, routing: bool, use_im_start_end: bool = False) -> str:
    """The full prompt string of the routing pass (routing=True) or the answer pass."""
    image = f"{IM_START}{IMAGE_PLACEHOLDER}{IM_END}" if use_im_start_end else IMAGE_PLACEHOLDER
    body = (ROUTING_PROMPT + question) if routing else question
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


def parse_routing(response: str) -> list[int]:
    """Upstream `get_routing_weights`: first three comma segments, then an uppercase substring test per letter."""
    kept = ",".join(response.split(",")[:3])
    return [1 if letter in kept else 0 for letter in EXPERT_LETTERS]


def routed_letters(mask: Sequence[int]) -> list[str]:
    return [letter for letter, bit in zip(EXPERT_LETTERS, mask) if bit]
