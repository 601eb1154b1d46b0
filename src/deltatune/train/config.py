"""TrainConfig: everything a training run needs, from a YAML file and/or flags."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.config import DeltaConfig
from ..core.errors import ConfigError
from ..core.parsing import read_yaml
from ..core.quant import SCHEMES as QUANT_SCHEMES
from .losses import check_class_weights

TASKS = ("auto", "classification", "generation")
SCHEDULES = ("linear", "cosine", "constant")
SELECT_METRICS = ("loss", "accuracy", "macro_f1")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    model: str = "minilm-l6"                 # zoo name or local HF directory
    data: str = "bbc"                         # zoo name or local .jsonl/.json/.csv/.tsv
    validation_data: str | None = None
    test_data: str | None = None
    task: str = "auto"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    answer_column: str = "answer"
    delta: dict[str, Any] = field(default_factory=lambda: {"kind": "lora", "r": 8, "alpha": 16})
    name: str = "default"
    output_dir: str = "runs/default"
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    loraplus_ratio: float = 1.0
    head_lr: float | None = None              # lr of the new head (modules_to_save / head modules); None: lr
    class_weights: Any = "none"               # none | balanced | sqrt | [w_0, ..., w_K-1] (train/losses.py)
    label_smoothing: float = 0.0
    max_length: int = 128
    eval_every: int | None = None
    eval_batch_size: int = 64
    max_eval_examples: int | None = None
    early_stopping_patience: int | None = None
    select_metric: str | None = None          # loss | accuracy | macro_f1: keep (save, test) the best evaluation's state
    checkpoint_every: int | None = None
    resume: bool = False
    lisa_layers: int | None = None
    lisa_interval: int = 20
    procedure: dict[str, Any] | None = None  # e.g. {kind: lt_sft, ...}: a procedure made of runs (train/procedures.py)
    train_examples: int | None = None        # cap the training set (N examples, stratified by label, seeded)
    max_new_tokens: int = 256
    seed: int = 0
    log_every: int = 10
    plot: bool = True
    progress: bool = True
    quantize: str | None = None              # nf4 | fp4 | int8: quantise the base's linears (docs/quantization.md)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("batch_size", "grad_accum", "max_length", "eval_batch_size", "lisa_interval", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.quantize is not None and self.quantize not in QUANT_SCHEMES:
            raise ConfigError(f"quantize must be one of {QUANT_SCHEMES} (or unset), got {self.quantize!r}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if self.head_lr is not None and not (_is_number(self.head_lr) and self.head_lr > 0):
            raise ConfigError(f"head_lr must be > 0 (or unset for lr), got {self.head_lr!r}")
        if not (_is_number(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0):
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        check_class_weights(self.class_weights)
        if self.select_metric is not None and self.select_metric not in SELECT_METRICS:
            raise ConfigError(f"select_metric must be one of {SELECT_METRICS} (or unset), got {self.select_metric!r}")
        if self.early_stopping_patience is not None and not (
                isinstance(self.early_stopping_patience, int) and self.early_stopping_patience >= 1):
            raise ConfigError(f"early_stopping_patience must be >= 1 (or unset), got {self.early_stopping_patience!r}")
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError("give epochs > 0 or max_steps")
        if isinstance(self.delta, DeltaConfig):
            self.delta = self.delta.to_dict()
        self.delta_config()  # validate now, not after the model is loaded
        if self.procedure is not None:
            from .procedures import get_procedure

            get_procedure(self.procedure).check(self)

    def delta_config(self) -> DeltaConfig:
        return DeltaConfig.from_dict(dict(self.delta))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def coerce(cls, cfg: "TrainConfig | dict | str | Path | None", **overrides: Any) -> "TrainConfig":
        """A TrainConfig from a TrainConfig, a dict of options or a YAML path; keyword options override it."""
        if cfg is None or isinstance(cfg, dict):
            return cls.from_dict({**(cfg or {}), **overrides})
        if isinstance(cfg, (str, Path)):
            return cls.from_yaml(cfg, **overrides)
        return cls.from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        data = read_yaml(Path(path), "training config", ConfigError) or {}  # bounded: no alias blow-up, no deep nesting
        if not isinstance(data, dict):
            raise ConfigError(f"training config {str(path)!r} must be a mapping of options")
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
