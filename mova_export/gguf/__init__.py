"""The LLM becomes GGUF: streamed conversion with gguf-py, quantization with llama.cpp (convert.py)."""
from .convert import (BITS_PER_WEIGHT, QTYPES, LLMSource, convert_checkpoint_to_gguf, estimate_gguf_bytes,
                      gguf_from_checkpoint, gguf_from_source, quantize_gguf, source_from_checkpoint,
                      source_from_state_dict, write_gguf)

__all__ = ["BITS_PER_WEIGHT", "QTYPES", "LLMSource", "convert_checkpoint_to_gguf", "estimate_gguf_bytes",
           "gguf_from_checkpoint", "gguf_from_source", "quantize_gguf", "source_from_checkpoint",
           "source_from_state_dict", "write_gguf"]
