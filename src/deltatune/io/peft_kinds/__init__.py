"""The PEFT mappings, one module per peft adapter type (or family); each registers a `PeftKind`
(io/peft/registry.py). These modules name methods by design: they are where a peft type meets a deltatune method."""
from . import adalora, bias_norm, ia3, lora, lycoris, poly, prefix, prompts, random_bases, shira  # noqa: F401
