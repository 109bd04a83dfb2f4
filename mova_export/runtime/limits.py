"""What one request may make the runtime do: its question and max_new_tokens against the LLM's context.

MoVA runs the LLM twice per request (runtime/two_pass.py): the routing pass (prompt + routing tokens, then up to
`max_routing_tokens` new tokens) and the answer pass (prompt + image tokens, then up to `max_new_tokens`). Both must
fit the llama.cpp context (n_ctx). This check runs when the request is made, before any pixel is touched, with the
prompts the passes will use (tokenized by the GGUF's vocabulary as they will be), so a
question that is too long or a max_new_tokens beyond what the context has left gets one line that says by how much,
never a llama.cpp failure halfway through a request. The image's pixel limit is core/image_inputs.MAX_IMAGE_PIXELS.
"""
from __future__ import annotations

from typing import Any

from ..core.errors import RuntimeInputError
from ..core.prompts import chat_prompt


def image_positions(manifest: Any) -> tuple[int, int]:
    """(answer pass image tokens, routing pass routing tokens) from the adapter_routing graph's declared outputs."""
    graph = manifest.graph_of_role("adapter_routing")
    shapes = {t.name: t.shape for t in graph.outputs} if graph is not None else {}
    image = shapes.get("image_tokens", (1, 0))
    routing = shapes.get("routing_tokens", (1, manifest.model.num_routing_tokens))
    return int(image[1]), int(routing[1])


def check_context(runtime: Any, question: str, max_new_tokens: int) -> None:
    """RuntimeInputError when either pass of (question, max_new_tokens) would not fit the LLM's context."""
    n_ctx = getattr(runtime.llm, "n_ctx", None)
    if not isinstance(n_ctx, int) or n_ctx <= 0:
        return                     # an LLM without a context size (a test double): nothing to check against
    facts, llm = runtime.facts, runtime.llm      # the LLM's own tokenizer (thread-safe), not the passes' cache
    image, routing = image_positions(runtime.bundle.manifest)
    routing_ids = llm.encode_prompt(chat_prompt(question, routing_prompt=facts.routing_prompt,
                                                     use_im_start_end=facts.mm_use_im_start_end))
    answer_ids = llm.encode_prompt(chat_prompt(question, use_im_start_end=facts.mm_use_im_start_end))
    # the image marker in the ids stands where the image (or routing) tokens go
    routing_prompt = sum(t >= 0 for t in routing_ids) + routing
    answer_prompt = sum(t >= 0 for t in answer_ids) + image
    over = max(routing_prompt + facts.max_routing_tokens, answer_prompt + 1) - n_ctx
    if over > 0:
        raise RuntimeInputError(
            f"the question is too long for the LLM's context: with the image's tokens the prompt takes "
            f"{max(routing_prompt + facts.max_routing_tokens, answer_prompt + 1)} of {n_ctx} positions (the routing "
            f"pass's {facts.max_routing_tokens} new tokens and one answer token included); shorten it by at least "
            f"{over} tokens (about {4 * over} characters), or run with a larger n_ctx")
    left = n_ctx - answer_prompt
    if max_new_tokens > left:
        raise RuntimeInputError(
            f"max_new_tokens={max_new_tokens} does not fit: the question's prompt takes {answer_prompt} of the LLM's "
            f"{n_ctx} context positions (image tokens included), leaving {left}; ask for at most {left} new tokens, "
            "shorten the question, or run with a larger n_ctx")
