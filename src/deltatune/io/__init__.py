"""Files: the detached Delta, the registry of file formats (native, PEFT, AdapterHub), checkpoints, atomic writes."""
from . import native, peft, adapterhub  # noqa: F401  (each registers its format)
