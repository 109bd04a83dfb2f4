"""`mova-export serve`: an OpenAI-compatible HTTP endpoint over the torch-free runtime (the `serve` extra:
FastAPI, uvicorn, prometheus-client). app.py holds the endpoints, protocol.py the OpenAI schema and MoVA's reading of
it, metrics.py the Prometheus metrics, server.py the uvicorn process."""
from __future__ import annotations

from .app import ServeOptions, create_app
from .server import serve

__all__ = ["ServeOptions", "create_app", "serve"]
