"""The PyTorch reference: MoVA's two passes on the checkpoint's own modules, the ground truth for parity.

pipeline.py    ReferencePipeline (the runtime's two-pass orchestration with PyTorch runners)
preprocess.py  upstream's preprocessing with transformers' image processors
llm.py         transformers' LlamaForCausalLM with the image embeddings spliced in, greedy decoding
runners.py     TorchRunner: a component module behind the runners' infer(feed) interface
"""
from .pipeline import ReferenceLLM, ReferencePipeline, ReferenceVision, load_text_tokenizer

__all__ = ["ReferenceLLM", "ReferencePipeline", "ReferenceVision", "load_text_tokenizer"]
