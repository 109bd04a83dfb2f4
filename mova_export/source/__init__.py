"""What a MoVA checkpoint says, read on the build side (torch where tensors are read).

config.py      config.json -> MoVAConfig, with visible defaults for what the reference marks inferred
llama3.py      the Llama-3 tokenizer files of a checkpoint
photos.py      real photographs that ship with scikit-image and matplotlib, and questions about them
checkpoint.py  the shard index and lazy tensors, split by the registry's components (it sits above components/:
               config.py sits below it, so the registry never imports the checkpoint)
"""
