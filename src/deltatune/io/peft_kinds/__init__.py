"""The PEFT mappings, one module per peft adapter type; each registers a `PeftKind` (io/peft/registry.py).
These modules name methods by design: they are the one place where a peft type meets a deltatune method."""
from . import lora  # noqa: F401
