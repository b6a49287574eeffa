"""Serving many adapters on one base model: a continuous-batching engine behind OpenAI's API.

- :class:`ServedModel`: the base causal LM, its tokenizer and the loaded adapters;
- :class:`Engine`: the decoding loop that batches requests across adapters as they come and go;
- :func:`create_app`: the FastAPI application (OpenAI's routes and vLLM's adapter routes);
- :func:`serve` (foreground) and :func:`background` (a thread): the app on uvicorn.
"""

from lorakit.serving.app import create_app
from lorakit.serving.engine import Completion, Engine, Event
from lorakit.serving.models import AdapterInfo, ServedModel, load_base
from lorakit.serving.sampling import SamplingParams
from lorakit.serving.server import background, serve

__all__ = [
    "Engine",
    "Event",
    "Completion",
    "ServedModel",
    "AdapterInfo",
    "load_base",
    "SamplingParams",
    "create_app",
    "serve",
    "background",
]
