"""mova-export: turn a MoVA checkpoint into deployable graphs, engines and a GGUF LLM, and run them."""
__version__ = "0.1.0"
