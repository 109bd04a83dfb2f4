"""The device runtime: a bundle becomes answers. No torch, no transformers (it installs next to JetPack's stack).

    from mova_export.runtime import MoVARuntime
    with MoVARuntime.from_bundle("bundle") as rt:
        print(rt.ask(frame, "What is on the table?").text)

session.py   MoVARuntime (loading, the lock, ask / ask_stream / frame / submit, warm-up), RuntimeOptions
requests.py  StreamingAnswer, FrameHandle (several questions on one frame), deadlines
frames.py    the frame cache: what MoVA computes from the pixels alone, kept per frame (LRU bounded in MiB)
worker.py    submit's worker thread: latest / queue policies per stream, cancel, deadline, callbacks
two_pass.py  MoVA's two passes, shared with the PyTorch reference (they differ only in their runners)
vision.py    the bundle's vision graphs behind the two-pass VisionRunners interface
llm.py       the GGUF LLM in llama.cpp, with the image embeddings injected
The ONNX Runtime and TensorRT runners are mova_export.runners (shared with the build side).
"""
from .frames import FrameCache, FrameState, frame_key
from .requests import FrameHandle, StreamingAnswer, sampling_of
from .session import MoVARuntime, RuntimeOptions, peak_rss_mib
from .two_pass import STAGES, Answer, Request, Sampling, two_passes
from .worker import POLICIES, AnswerFuture

__all__ = ["POLICIES", "STAGES", "Answer", "AnswerFuture", "FrameCache", "FrameHandle", "FrameState", "MoVARuntime",
           "Request", "RuntimeOptions", "Sampling", "StreamingAnswer", "frame_key", "peak_rss_mib", "sampling_of",
           "two_passes"]
