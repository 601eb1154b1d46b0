"""TrainConfig: everything a training run needs, from a YAML file and/or flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any

from ..core.config import DeltaConfig
from ..core.errors import ConfigError
from ..core.parsing import read_yaml, short
from ..core.schema import Dropout, NoneMeans, NonNegative, NonNegativeInt, OneOf, Positive, PositiveInt, Range, Unit, validate_fields
from ..core.suggest import did_you_mean
from ..core.quant import SCHEMES as QUANT_SCHEMES
from .device import check_device, check_precision
from .losses import check_class_weights

TASKS = ("auto", "classification", "generation")
SCHEDULES = ("linear", "cosine", "constant")
SELECT_METRICS = ("loss", "accuracy", "macro_f1")


@dataclass
class TrainConfig:
    """Every option of a training run. Each field's annotation is its schema (core/schema.py): values are converted
    to the declared type first ("1e-4", "16", "false" from YAML or ``--set``; core/coerce.py), then checked, with one
    message style (``TrainConfig.lr must be a positive number, got 'abc'``). A new field needs only its annotation."""

    model: str = "minilm-l6"                 # zoo name or local HF directory
    data: str = "bbc"                         # zoo name or local .jsonl/.json/.csv/.tsv
    validation_data: str | None = None
    test_data: str | None = None
    task: Annotated[str, OneOf(TASKS)] = "auto"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    answer_column: str = "answer"
    delta: dict[str, Any] = field(default_factory=lambda: {"kind": "lora", "r": 8, "alpha": 16})
    name: str = "default"
    output_dir: str = "runs/default"
    epochs: NonNegative = 1.0
    max_steps: Annotated[int | None, Range(1, unit="steps")] = None
    batch_size: PositiveInt = 16
    grad_accum: PositiveInt = 1
    lr: Positive = 1e-3
    weight_decay: NonNegative = 0.0
    warmup_ratio: Unit = 0.06
    schedule: Annotated[str, OneOf(SCHEDULES)] = "linear"
    loraplus_ratio: Positive = 1.0
    head_lr: Annotated[Positive | None, NoneMeans("lr")] = None  # lr of the new head (modules_to_save / head modules)
    class_weights: Any = "none"               # none | balanced | sqrt | [w_0, ..., w_K-1] (train/losses.py)
    label_smoothing: Dropout = 0.0            # in [0, 1)
    max_length: PositiveInt = 128
    eval_every: Annotated[NonNegativeInt | None, NoneMeans("5 times per run")] = None
    eval_batch_size: PositiveInt = 64
    max_eval_examples: NonNegativeInt | None = None
    early_stopping_patience: PositiveInt | None = None
    #: loss | accuracy | macro_f1: keep (save, test) the best evaluation's state
    select_metric: Annotated[str | None, OneOf(SELECT_METRICS), NoneMeans("the last state")] = None
    checkpoint_every: Annotated[NonNegativeInt | None, NoneMeans("no checkpoints")] = None
    resume: bool = False
    lisa_layers: Annotated[NonNegativeInt | None, NoneMeans("no LISA")] = None
    lisa_interval: PositiveInt = 20
    procedure: dict[str, Any] | None = None  # e.g. {kind: lt_sft, ...}: a procedure made of runs (train/procedures.py)
    train_examples: PositiveInt | None = None  # cap the training set (N examples, stratified by label, seeded)
    max_new_tokens: PositiveInt = 256
    seed: int = 0
    log_every: PositiveInt = 10
    plot: bool = True
    progress: bool = True
    quantize: Annotated[str | None, OneOf(QUANT_SCHEMES), NoneMeans("not quantised")] = None  # docs/quantization.md
    device: str = "auto"                     # auto (CUDA when available) | cpu | cuda | cuda:N (train/device.py)
    precision: str = "fp32"                  # fp32 | bf16 | fp16 (autocast; fp16 with a gradient scaler)

    def __post_init__(self) -> None:
        if isinstance(self.delta, DeltaConfig):
            self.delta = self.delta.to_dict()
        validate_fields(self)  # every option converted to its declared type and checked against its annotation
        check_device(self.device)
        check_precision(self.precision)
        check_class_weights(self.class_weights)
        if self.max_steps is None and self.epochs <= 0:
            raise ConfigError("give epochs > 0 or max_steps")
        self.delta_config()  # validate now, not after the model is loaded
        if self.procedure is not None:
            from .procedures import get_procedure

            get_procedure(self.procedure).check(self)

    def delta_config(self) -> DeltaConfig:
        return DeltaConfig.from_dict(dict(self.delta))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = [f.name for f in fields(cls)]
        unknown = sorted((k for k in data if k not in known), key=str)
        if unknown:
            raise ConfigError(f"unknown training option {short(unknown[0])}{did_you_mean(unknown[0], known)}"
                              f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; known: {sorted(known)}")
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
