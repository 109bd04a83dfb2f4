"""The device runtime: a bundle becomes answers. No torch, no transformers (it installs next to JetPack's stack).

    from mova_export.runtime import MoVARuntime
    with MoVARuntime.from_bundle("bundle") as rt:
        print(rt.ask(frame, "What is on the table?").text)

session.py   MoVARuntime (loading, the lock, streaming, warm-up), RuntimeOptions
two_pass.py  MoVA's two passes, shared with the PyTorch reference (they differ only in their runners)
vision.py    the bundle's vision graphs behind the two-pass VisionRunners interface
runners.py   ONNX Runtime and TensorRT runners (one infer(feed) interface)
llm.py       the GGUF LLM in llama.cpp, with the image embeddings injected
"""
from .session import MoVARuntime, RuntimeOptions, StreamingAnswer, peak_rss_mib
from .two_pass import STAGES, Answer, Request, two_passes

__all__ = ["STAGES", "Answer", "MoVARuntime", "Request", "RuntimeOptions", "StreamingAnswer", "peak_rss_mib",
           "two_passes"]
