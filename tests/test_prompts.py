"""Routing prompt, chat frame, <image> tokenization and letter parsing: exactly as upstream MoVA."""
import pytest

from mova_export.components import expert_letters, routing_prompt_lines
from mova_export.core.prompts import (
    IMAGE_TOKEN_INDEX,
    adapter_text,
    chat_prompt,
    mask_label,
    parse_routing,
    routed_letters,
    routing_prompt,
    tokenize_with_image,
)

LETTERS = expert_letters()
ROUTING_PROMPT = routing_prompt(routing_prompt_lines())


@pytest.mark.parametrize("response, letters", [
    ("A, D", ["A", "D"]),
    ("none", []),
    ("a,b", []),                           # upstream tests uppercase substrings only
    ("A B C D", ["A", "B", "C", "D"]),     # no commas: one segment, every letter counts (adapter top-3 caps it)
    ("A, B, C, D", ["A", "B", "C"]),       # only the first three comma segments are kept
    ("G", ["G"]),
    ("Expert A and C", ["A", "C", "E"]),  # the substring test also sees the E of "Expert"
    ("", []),
    ("???", []),
])
def test_parse_routing_matches_upstream(response, letters):
    assert LETTERS == tuple("ABCDEFG")
    assert routed_letters(parse_routing(response, LETTERS), LETTERS) == letters
    assert mask_label(parse_routing(response, LETTERS), LETTERS) == ("".join(letters) or "none")


def test_routing_prompt_is_verbatim():
    assert ROUTING_PROMPT.startswith("You are a helpful assistant router.")
    assert "\nA. This model can effectively extract" in ROUTING_PROMPT
    assert "\nG. This model is a leading image segmentation framework" in ROUTING_PROMPT
    assert ROUTING_PROMPT.endswith("strong zero-shot segmentation performance.\n\nQuestion:\n")
    assert ROUTING_PROMPT.count("\n") == 11


def test_chat_frames():
    routing = chat_prompt("What is this?", routing_prompt=ROUTING_PROMPT)
    answer = chat_prompt("What is this?")
    head = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision"
    assert routing.startswith(head) and answer.startswith(head)
    assert answer.endswith("<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat is this?<|eot_id|>"
                           "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "<image>\n" + ROUTING_PROMPT + "What is this?<|eot_id|>" in routing
    assert chat_prompt("q", use_im_start_end=True).count("<im_start><image><im_end>\n") == 1


def test_adapter_text_lowercases_question_only():
    assert adapter_text("<image>\nWhat Is THIS?") == "question 0: what is this?\n\n"


def _toy_encode(text):
    """Like a HF Llama-3 tokenizer call: BOS (id 1) first, then one id per character (special tokens atomic)."""
    ids, i = [1], 0
    while i < len(text):
        if text.startswith("<|begin_of_text|>", i):
            ids.append(1)
            i += len("<|begin_of_text|>")
        else:
            ids.append(ord(text[i]))
            i += 1
    return ids


def test_tokenize_with_image_keeps_upstream_double_bos_and_single_marker():
    ids = tokenize_with_image("<|begin_of_text|>ab<image>cd", _toy_encode, bos_token_id=1)
    assert ids == [1, 1, 97, 98, IMAGE_TOKEN_INDEX, 99, 100]
    # a tokenizer that adds no BOS: chunks are kept whole
    ids = tokenize_with_image("ab<image>cd<image>e", lambda t: [ord(c) for c in t], bos_token_id=1)
    assert ids == [97, 98, IMAGE_TOKEN_INDEX, 99, 100, IMAGE_TOKEN_INDEX, 101]
