"""deltatune: parameter-efficient fine-tuning as named, composable, saveable deltas on frozen models."""
from . import errors
from .runtime import activate, active, active_block, active_names, attach, detach, merge, route, summary, unload, unmerge
from .methods import IA3, Fusion, Poly
from .core.calls import batch
from .compose import Arrow, Average, Fuse, Route, Stack, Sum
from .core.config import DeltaConfig
from .io.delta import Delta
from .io.files import load, save
from .methods import Dense, Full, LoRA, PaCA, Sparse, Ternary
from .methods import LoHa, LoKr, SORSA
from .methods import SSF, BitFit, LNTuning
from .methods import VeRA, LoRAXS, RandLoRA
from .methods import AdaLoRA
from .methods import PrefixTuning, PromptTuning
from .methods import AdaptFormer, Houlsby, ParallelAdapter, Pfeiffer
from .train.optim import param_groups
from .core.tensors import DenseDelta, DeltaTensor, LowRankDelta, SparseDelta
from . import init

__version__ = "0.1.0"

__all__ = [
    "Delta", "DeltaConfig", "DeltaTensor", "Dense", "DenseDelta", "Full", "LoRA", "LowRankDelta", "PaCA", "Sparse", "SparseDelta", "Ternary", "activate",
    "active", "active_names", "attach", "detach", "errors", "init", "load", "merge", "param_groups", "save", "summary",
    "unload", "unmerge",
]
__all__ += ["LoHa", "LoKr", "SORSA"]
__all__ += ["SSF", "BitFit", "LNTuning"]
__all__ += ["VeRA", "LoRAXS", "RandLoRA"]
__all__ += ["active_block", "route", "Arrow", "Average", "Fuse", "Route", "Stack", "Sum"]
__all__ += ["AdaLoRA"]
__all__ += ["IA3"]
__all__ += ["Fusion"]
__all__ += ["PrefixTuning", "PromptTuning"]
__all__ += ["AdaptFormer", "Houlsby", "ParallelAdapter", "Pfeiffer"]
__all__ += ["Poly", "batch"]
