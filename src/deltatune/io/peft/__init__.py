"""The PEFT format: the generic codec (`codec.py`) and the registry of peft adapter types it maps (`registry.py`);
each type's mapping lives in `io/peft_kinds/` and registers itself."""
from .codec import (CONFIG_FILE, PICKLE_FILE, PREFIX, WEIGHTS_FILE, PeftDelta, PeftFile, SizedDelta, fan_in_fan_out,
                    layer_type, linear_tensors, module_key, read_peft, shared_tensor, task_type, write_peft)
from .registry import PeftKind, kinds, peft_types, register_kind

__all__ = ["CONFIG_FILE", "PICKLE_FILE", "PREFIX", "WEIGHTS_FILE", "PeftDelta", "PeftFile", "PeftKind", "SizedDelta",
           "fan_in_fan_out", "kinds", "layer_type", "linear_tensors", "module_key", "peft_types", "read_peft",
           "register_kind", "shared_tensor", "task_type", "write_peft"]
