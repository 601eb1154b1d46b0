"""The `deltatune` command line (train, eval, inspect, merge, compress, extract); the commands live in `main.py`."""
from .main import app, main

__all__ = ["app", "main"]
