"""Training: dt.train, the loop behind `deltatune train`."""
from .config import TrainConfig
from .loop import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
