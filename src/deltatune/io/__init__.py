"""Files: the detached Delta, the registry of file formats (native, PEFT, AdapterHub), checkpoints, atomic writes."""
from . import native, peft, peft_kinds, adapterhub  # noqa: F401  (each registers its format; peft_kinds its PEFT mappings)
