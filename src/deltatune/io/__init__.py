"""Files: the detached Delta, the registry of file formats (native, PEFT), checkpoints, atomic writes."""
from . import native, peft  # noqa: F401  (each registers its format)
