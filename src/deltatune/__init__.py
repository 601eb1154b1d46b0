"""deltatune: parameter-efficient fine-tuning as named, composable, saveable deltas on frozen models."""
from . import errors
from .api import activate, active, active_names, attach, detach, merge, summary, unload, unmerge
from .config import DeltaConfig
from .delta import Delta
from .files import load, save
from .methods import Dense, Full, LoRA, PaCA, Sparse, Ternary
from .optim import param_groups
from .tensors import DenseDelta, DeltaTensor, LowRankDelta, SparseDelta
from . import init

__version__ = "0.1.0"

__all__ = [
    "Delta", "DeltaConfig", "DeltaTensor", "Dense", "DenseDelta", "Full", "LoRA", "LowRankDelta", "PaCA", "Sparse", "SparseDelta", "Ternary", "activate",
    "active", "active_names", "attach", "detach", "errors", "init", "load", "merge", "param_groups", "save", "summary",
    "unload", "unmerge",
]
