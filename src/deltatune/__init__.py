"""deltatune: parameter-efficient fine-tuning as named, composable, saveable deltas on frozen models."""
from . import errors
from .runtime import (activate, active, active_block, active_names, attach, detach, merge, merge_and_unload, rounding_report,
                      route, summary, unload, unmerge)
from .core.quantize import quantize
from .core.calls import batch
from .compose import Arrow, Average, Fuse, Route, Stack, Sum
from .core.config import DeltaConfig
from .io.delta import Delta
from .io.files import load, save
from .train.optim import param_groups
from . import train  # the package, callable: dt.train(config_or_path, **options) runs one training run
from .core.tensors import DenseDelta, DeltaTensor, LowRankDelta, SparseDelta
from . import init
from .methods import CONFIGS as _CONFIGS

globals().update(_CONFIGS)  # every registered method config: dt.LoRA, dt.IA3, ... (a new method file adds one)

__version__ = "0.1.0"


def __getattr__(name: str):  # dt.DeltaCallback without importing transformers' Trainer on `import deltatune`
    if name == "DeltaCallback":
        from .train.callback import DeltaCallback

        return DeltaCallback
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")

__all__ = ["Arrow", "Average", "Delta", "DeltaCallback", "DeltaConfig", "DeltaTensor", "DenseDelta", "Fuse", "LowRankDelta", "Route",
           "SparseDelta", "Stack", "Sum", "activate", "active", "active_block", "active_names", "attach", "batch", "detach",
           "errors", "init", "load", "merge", "merge_and_unload", "param_groups", "quantize", "rounding_report", "route",
           "save", "summary", "train", "unload", "unmerge",
           *sorted(_CONFIGS)]
