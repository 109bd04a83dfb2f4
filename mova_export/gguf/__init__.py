"""The LLM becomes GGUF: streamed conversion with gguf-py, quantization with llama.cpp (convert.py, which needs
torch); the table of GGUF types (qtypes.py, pure Python)."""
from ..core.qtypes import BITS_PER_WEIGHT, QTYPES

__all__ = ["BITS_PER_WEIGHT", "QTYPES"]
