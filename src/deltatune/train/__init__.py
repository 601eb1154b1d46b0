"""Training: `dt.train(config_or_path, **options)`, the loop behind `deltatune train`.

`deltatune.train` is this package *and* the function: calling the package runs `loop.train`. A package attribute
of the same name cannot be a function (importing any submodule, e.g. `deltatune.train.data`, rebinds
`deltatune.train` to the package), so the package itself is made callable (a `ModuleType` subclass, the documented
way to customise a module object). `import deltatune.train`, `from deltatune.train import train, TrainConfig` and
`deltatune.train.loop` keep working.
"""
from __future__ import annotations

import inspect
import sys
import types
from typing import Any

from .config import TrainConfig
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]


class _TrainPackage(types.ModuleType):
    """The `deltatune.train` package; calling it is `deltatune.train.loop.train`."""

    def __call__(self, *args: Any, **kwargs: Any) -> TrainResult:
        return train(*args, **kwargs)


__signature__ = inspect.signature(train)  # what inspect.signature(dt.train) / IDEs show for the call
sys.modules[__name__].__class__ = _TrainPackage
