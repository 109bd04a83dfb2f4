"""The transformers side of MoVA's LLM passes: the same operations as runtime.llm.LlamaCppLLM on a
LlamaForCausalLM (inputs_embeds with the image spliced in at the marker, greedy decoding), for the PyTorch
reference and the parity tests."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from ..core.errors import LLMError
from ..runtime.llm import as_embeddings, split_at_marker


def hf_inputs_embeds(model: Any, ids: Sequence[int], image_embeddings: Any = None) -> Any:
    """[1, positions, H] inputs_embeds: text ids embedded, the image embeddings spliced in at the marker
    (upstream prepare_inputs_labels_for_multimodal for B=1)."""
    import torch

    embed = model.get_input_embeddings()
    before, after = split_at_marker(ids, image_embeddings is not None, "hf_inputs_embeds")
    device, dtype = embed.weight.device, embed.weight.dtype

    def text(part: list[int]) -> "torch.Tensor":
        with torch.no_grad():
            return embed(torch.tensor(part, dtype=torch.long, device=device))

    parts = [text(before)] if before else []
    if after is not None:
        width = embed.weight.shape[1]
        image = torch.as_tensor(as_embeddings(image_embeddings, width, "hf_inputs_embeds"))
        parts.append(image.to(device=device, dtype=dtype))
        if after:
            parts.append(text(after))
    if not parts:
        raise LLMError("hf_inputs_embeds: the prompt is empty")
    return torch.cat(parts, dim=0)[None]


def hf_logits(model: Any, ids: Sequence[int], image_embeddings: Any = None) -> np.ndarray:
    """Logits [positions, vocab] (float32) of one transformers forward over the spliced prompt."""
    import torch

    with torch.inference_mode():
        out = model(inputs_embeds=hf_inputs_embeds(model, ids, image_embeddings), use_cache=False)
    return out.logits[0].float().cpu().numpy()


def hf_generate_stream(model: Any, ids: Sequence[int], image_embeddings: Any, max_new_tokens: int,
                       eos_ids: Sequence[int]) -> Iterator[int]:
    """Greedy decoding on a transformers LlamaForCausalLM, one id at a time: prefill inputs_embeds (image spliced in
    at the marker), then one token per step with the KV cache. Stops before a stop id (never yielded)."""
    import torch

    stops = {int(e) for e in eos_ids}
    with torch.inference_mode():
        res = model(inputs_embeds=hf_inputs_embeds(model, ids, image_embeddings), use_cache=True)
        for step in range(max_new_tokens):
            token = int(torch.argmax(res.logits[0, -1].float()))
            if token in stops:
                return
            yield token
            if step + 1 < max_new_tokens:
                nxt = torch.tensor([[token]], dtype=torch.long, device=res.logits.device)
                res = model(input_ids=nxt, past_key_values=res.past_key_values, use_cache=True)


def hf_generate(model: Any, ids: Sequence[int], image_embeddings: Any, max_new_tokens: int,
                eos_ids: Sequence[int]) -> list[int]:
    """The generated ids of hf_generate_stream (without the stop id; the same contract as LlamaCppLLM.generate)."""
    return list(hf_generate_stream(model, ids, image_embeddings, max_new_tokens, eos_ids))
