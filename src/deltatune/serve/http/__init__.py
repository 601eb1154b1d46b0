"""`deltatune serve`: an OpenAI-compatible HTTP server over the serving engine — API keys with per-delta access and
rate limits, hot load/unload, Prometheus metrics (docs/serving.md, section "HTTP server")."""
from .keys import KeyStore, add_key, read_keys
from .server import build, is_loopback, run

__all__ = ["KeyStore", "add_key", "build", "is_loopback", "read_keys", "run"]
