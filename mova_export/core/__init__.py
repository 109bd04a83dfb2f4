"""What the build side and the device runtime share: pure Python plus numpy, PIL and tokenizers, never torch.

errors.py            the one exception family (one-line messages naming the fix)
spec.py              TensorSpec, GraphForm, PRECISIONS: declarations only
tolerance.py         Tolerance, Parity, ParityReport: the one parity vocabulary
facts.py             ModelFacts: what running MoVA needs besides weights (carried in the manifest)
prompts.py           MoVA's prompts and the routing answer's parser
slots.py             the adapter's top-K slot contract (numpy)
bert_inputs.py       the BERT text encoder's WordPiece inputs and length buckets
image_inputs.py      image loading and every tower's numpy preprocessing
qtypes.py            the GGUF quant types table
tensorrt_flavors.py  the three TensorRT flavors as rows of a table
jetpack.py           the JetPack releases (L4T, CUDA, TensorRT, DLA) and reading a Jetson's L4T release
platforms.py         DeviceInfo / current_device, EnginePlatform and the refusal of an engine built for another one
gpu.py               nvidia-smi queries
progress.py          Console: progress bars and log lines; Log, quiet
"""
