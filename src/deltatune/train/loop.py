"""dt.train: one training run — data, model, delta, optimizer, schedule, eval, early stopping, checkpoints."""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..runtime import attach
from ..core.config import DeltaConfig
from ..core.errors import ConfigError, DeltaNotFoundError
from ..core.parsing import read_json, short
from ..core.suggest import closest, did_you_mean
from ..io.files import save as save_delta
from ..io.delta import Delta
from ..runtime import slot_of, state_of
from .optim import param_groups
from ..core.targeting import head_paths
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import Collator, Splits, count_tokens, local_splits, subset
from .device import Precision, resolve_device, to_device
from .distributed import Dist, local_rank
from .evaluate import evaluate_classification
from .lisa import Lisa
from .losses import ClassificationLoss
from ..core.progress import Progress, duration
from ..zoo.load_report import held_load_reports
from ..runtime.step_hooks import after_optimizer_step, before_step, regularization


@dataclass
class TrainResult:
    output_dir: Path
    delta_path: Path | None
    steps: int
    metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def load_splits(cfg: TrainConfig) -> Splits:
    from .. import zoo

    if cfg.data in zoo.list_datasets():
        return zoo.load_dataset(cfg.data)
    if not Path(cfg.data).exists():  # neither a zoo dataset nor a file: say which names exist
        close = closest(cfg.data, zoo.list_datasets())
        raise DeltaNotFoundError(f"data {cfg.data!r} is neither a zoo dataset nor an existing file"
                                 f"{f'; did you mean {close!r}?' if close else ''} (zoo datasets: "
                                 f"{', '.join(zoo.list_datasets())}; or a .jsonl/.json/.csv/.tsv file)")
    task = "classification" if cfg.task == "auto" else cfg.task
    return local_splits(cfg.data, task, cfg.text_column, cfg.label_column, cfg.prompt_column, cfg.response_column,
                        cfg.answer_column, cfg.validation_data, cfg.test_data, cfg.seed)


def load_model(cfg: TrainConfig, task: str, num_labels: int | None,
               provided: Callable[[nn.Module], tuple[str, ...] | str] | None = None) -> tuple[nn.Module, Any]:
    """The base model and tokenizer `cfg` names, its linears quantised when `cfg.quantize` is set (the base's memory
    before and after is reported on stderr). transformers' load report (weights missing from the checkpoint, e.g. a
    new classification head) is left out when every module it lists is in `provided(model)`, the
    `modules_to_save` of the delta that will go on the model (`trained_whole`); otherwise it is shown."""
    with held_load_reports() as reports:
        net, tok = _load_model(cfg, task, num_labels)
    reports.release(net, provided(net) if provided is not None else ())
    if cfg.quantize:
        from ..core.quantize import quantize

        before = base_bytes(net)
        quantize(net, cfg.quantize)
        after = base_bytes(net)
        print(f"quantize={cfg.quantize}: base weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
              f"({after / max(before, 1):.2f}x)", file=sys.stderr)
    return net, tok


def base_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, quantisation scales included."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            total += sum(t.numel() * t.element_size() for t in (qs.absmax, getattr(getattr(qs, "state2", None), "absmax", None))
                         if t is not None)
        scb = getattr(getattr(m, "state", None), "SCB", None) if getattr(getattr(m, "weight", None), "SCB", None) is None \
            else m.weight.SCB
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
    return total


def _load_model(cfg: TrainConfig, task: str, num_labels: int | None) -> tuple[nn.Module, Any]:
    from .. import zoo

    if cfg.model in zoo.list_models():
        return zoo.load_model(cfg.model, num_labels=num_labels if task == "classification" else None)
    path = Path(cfg.model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model {cfg.model!r} is neither a zoo model{did_you_mean(cfg.model, zoo.list_models())} (zoo "
                          f"models: {', '.join(zoo.list_models())}) nor a local HF directory with config.json")
    check_model_dir(path)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        if task == "classification":
            net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, use_safetensors=True)
        else:
            net = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)  # never a pickled checkpoint
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # transformers' errors for a damaged directory
        raise ConfigError(f"model directory {str(path)!r} could not be loaded ({type(e).__name__}: "
                          f"{short(str(e), 300)})") from None
    return net, tok


#: files of which a model directory needs one to have a tokenizer's vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")


def check_model_dir(path: Path) -> None:
    """Refuse a local model directory without a readable config, safetensors weights or a tokenizer, before
    anything is loaded (transformers would raise deep inside, or build an empty tokenizer)."""
    config = read_json(path / "config.json", "model config", ConfigError)
    if not isinstance(config, dict):
        raise ConfigError(f"model config {str(path / 'config.json')!r} must be a JSON object, got "
                          f"{type(config).__name__}")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        pickled = [n for n in ("pytorch_model.bin", "model.pt", "model.pth") if (path / n).is_file()]
        raise ConfigError(f"model directory {str(path)!r} has no safetensors weights (model.safetensors or "
                          f"model.safetensors.index.json)" + (f"; {pickled[0]} is a pickle, which deltatune never "
                                                              f"loads: convert it to safetensors" if pickled else ""))
    if not any((path / n).is_file() for n in TOKENIZER_FILES):
        raise ConfigError(f"model directory {str(path)!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                          f"save the tokenizer next to the model (tokenizer.save_pretrained)")


def trained_whole(delta: DeltaConfig, task: str) -> Callable[[nn.Module], tuple[str, ...] | str]:
    """The modules a training run's delta will train and save whole on a model: its `modules_to_save`, plus the
    head for classification (`with_head`)."""
    return lambda model: with_head(delta, model, task).modules_to_save


def with_head(delta: DeltaConfig, model: nn.Module, task: str) -> DeltaConfig:
    """For classification the (new) head trains in full and is saved with the delta."""
    if task != "classification" or delta.modules_to_save:
        return delta
    heads = sorted(head_paths(model) & {p for p, m in model.named_modules() if hasattr(m, "weight")})
    return delta.replace(modules_to_save=tuple(heads)) if heads else delta


def schedule(cfg: TrainConfig, total: int):
    warm = int(cfg.warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, total - warm)
        return max(0.0, 1 - frac) if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return factor


def training_loss(cfg: TrainConfig, task: str, train_set: list, n_labels: int | None) -> ClassificationLoss | None:
    """The loss the options ask for (class weights, label smoothing); None: the model's own loss."""
    weighted = cfg.class_weights not in (None, "none") or cfg.label_smoothing
    if task != "classification":
        if weighted:
            raise ConfigError("class_weights and label_smoothing apply to classification only")
        if cfg.select_metric in ("accuracy", "macro_f1"):
            raise ConfigError(f"select_metric={cfg.select_metric!r} needs classification; use 'loss' for {task}")
        return None
    return ClassificationLoss.from_options(cfg.class_weights, cfg.label_smoothing, [e["label"] for e in train_set],
                                           n_labels or 0)


def selection_score(metrics: dict[str, Any], select_metric: str | None) -> float:
    """Higher is better: the chosen validation metric (the loss negated); by default accuracy, else the loss."""
    if select_metric is None:
        return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]
    return -metrics["loss"] if select_metric == "loss" else metrics[select_metric]


class BatchOrder:
    """Global batches from seeded per-epoch permutations; rank r takes its slice of each global batch."""

    def __init__(self, n: int, per_rank: int, dist: Dist, seed: int) -> None:
        self.n, self.per_rank, self.dist, self.seed = n, per_rank, dist, seed
        self.global_size = per_rank * dist.world
        if n < self.global_size:
            raise ConfigError(f"the training set has {n} examples, fewer than one global batch ({self.global_size})")
        self.per_epoch = n // self.global_size
        self._perm: tuple[int, list[int]] | None = None

    def indices(self, k: int) -> list[int]:
        epoch, within = divmod(k, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g).tolist())
        start = within * self.global_size + self.dist.rank * self.per_rank
        return self._perm[1][start : start + self.per_rank]


def _trainable_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained parameters, and the deltas' buffers (which can change in training, e.g. regrown sparse indices)."""
    out = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or ".deltatune." in n}
    out.update({n: b.detach().clone() for n, b in model.named_buffers() if ".deltatune." in n})
    return out


def train(cfg: TrainConfig | dict | str | None = None, *, model: nn.Module | None = None, tokenizer: Any = None,
          splits: Splits | None = None, prepare: Callable[[nn.Module], Any] | None = None,
          **overrides: Any) -> TrainResult:
    """`dt.train(config_or_path, **options)`: train a delta. `cfg` is a TrainConfig, a dict of options or a YAML path
    (the options of `deltatune train`, docs/training.md); keyword options override it. Returns a `TrainResult`.
    Pass `model`/`tokenizer`/`splits` to use objects already in memory instead of loading by name.
    `prepare(model)` replaces attaching the configured delta (for baselines such as full fine-tuning or
    another library's adapters: it must leave exactly the parameters to train with requires_grad=True)."""
    cfg = TrainConfig.coerce(cfg, **overrides)
    if cfg.procedure is not None:  # e.g. LT-SFT: several runs of this loop
        from .procedures import get_procedure

        return get_procedure(cfg.procedure).run(cfg, model=model, tokenizer=tokenizer, splits=splits, prepare=prepare)
    return _Run(cfg, model, tokenizer, splits, prepare).run()


def step_line(record: dict[str, Any], total: int, eta: float | None) -> str:
    """The log line of a training record: step, mean loss since the last line, learning rate, tokens/s, ETA."""
    return (f"step {record['step']}/{total}  loss {record['loss']:.4f}  lr {record['lr']:.3g}  "
            f"tokens/s {record['tokens_per_s']:.0f}  ETA {duration(eta)}")


def eval_line(record: dict[str, Any], total: int) -> str:
    """The log line of an evaluation record: every validation metric (numbers only; e.g. not generations)."""
    metrics = "  ".join(f"{k} {v:.4f}" for k, v in record.items()
                        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool))
    return f"eval step {record['step']}/{total}  {metrics}"


class _Run:
    def __init__(self, cfg: TrainConfig, model: nn.Module | None, tokenizer: Any, splits: Splits | None,
                 prepare: Callable[[nn.Module], Any] | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device, local_rank())  # before anything is loaded: a bad device fails fast
        self.dist = Dist.from_env(self.device)  # NCCL on GPUs, gloo on the CPU
        self.precision = Precision(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.splits = splits or load_splits(cfg)
        self.task = self.splits.task if cfg.task == "auto" else cfg.task
        if self.task == "classification" and not self.splits.labels:
            raise ConfigError("classification needs labels; the data has none")
        n_labels = len(self.splits.labels) if self.splits.labels else None
        self.loaded_model = model is None
        if model is None:
            model, tokenizer = load_model(cfg, self.task, n_labels, trained_whole(cfg.delta_config(), self.task))
        if tokenizer is None:
            raise ConfigError("pass tokenizer= together with model=")
        self.model, self.tok = model, tokenizer
        self.train_set = subset(self.splits.train, cfg.train_examples, cfg.seed)  # stratified, not the first n
        self.val_set = subset(self.splits.validation, cfg.max_eval_examples, cfg.seed)
        self.loss_fn = training_loss(cfg, self.task, self.train_set, n_labels)
        self.out = Path(cfg.output_dir)
        self.delta_cfg = with_head(cfg.delta_config(), model, self.task)
        model.to(self.device)  # the base first, so initialisations that read its weights run on the device
        if prepare is None:
            attach(model, self.delta_cfg, cfg.name)
        else:
            if cfg.checkpoint_every or cfg.resume:
                raise ConfigError("checkpoints hold a delta; with prepare= (a baseline without one) leave "
                                  "checkpoint_every and resume unset")
            prepare(model)
        model.to(self.device)  # and whatever attaching added (before the optimizer sees the parameters)
        model.train()
        if cfg.lisa_layers and self.dist.enabled:
            raise ConfigError("LISA toggles requires_grad between steps, which DDP does not allow; train LISA in one process")
        self.lisa = Lisa(model, cfg.name, cfg.lisa_layers, cfg.lisa_interval, cfg.seed) if cfg.lisa_layers else None
        groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.loraplus_ratio, cfg.head_lr,
                              tuple(self.delta_cfg.modules_to_save or ()))
        if not any(g["params"] for g in groups):
            raise ConfigError("no parameter is trainable; check the delta config (or the prepare function)")
        self.opt = torch.optim.AdamW(groups)
        self.order = BatchOrder(len(self.train_set), cfg.batch_size, self.dist, cfg.seed)
        per_step = self.order.global_size * cfg.grad_accum
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.train_set) / per_step))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule(cfg, self.total))
        self.collate = Collator(tokenizer, "classification" if self.task == "classification" else "causal", cfg.max_length)
        self.wrapped = model
        torch.manual_seed(cfg.seed + self.dist.rank)  # same init on every rank above; own dropout stream below
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.history: list[dict[str, Any]] = []
        self.eval_progress: Callable[[int], None] | None = None  # the evaluation bar's advance(n), while one runs
        self.best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        self.bad_evals = 0
        self.step = 0

    # --- bookkeeping -----------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.out) if self.cfg.resume else None
        if ckpt is None:
            if self.dist.main and (self.out / "metrics.jsonl").exists():
                (self.out / "metrics.jsonl").unlink()
            return
        delta = Delta.read(ckpt / "delta")
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for path, state in delta.state.items():
                slot_of(modules[path])[self.cfg.name].load_state_dict(state)
        progress = load_checkpoint(ckpt, self.opt, self.sched)
        self.step, self.bad_evals = progress["step"], progress["bad_evals"]
        self.precision.load_state(progress["grad_scaler"])  # a checkpoint of another precision: the scaler starts fresh
        if self.dist.enabled:  # the checkpoint holds rank 0's RNG state: give every rank its own stream again
            torch.manual_seed(self.cfg.seed + self.dist.rank + 1_000_003 * self.step)
        if self.lisa is not None and progress.get("lisa"):
            self.lisa.load_state(progress["lisa"])
        self.history = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= self.step] if (self.out / "metrics.jsonl").exists() else []
        if self.dist.main:
            (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.history))

    def evaluate(self, examples: list) -> dict[str, Any]:
        """Metrics on `examples`, in the run's precision; `self.eval_progress(n)` after each batch of n examples."""
        progress = self.eval_progress
        with self.precision.autocast():
            if self.task == "classification":
                return evaluate_classification(self.model, self.tok, examples, len(self.splits.labels),
                                               self.cfg.eval_batch_size, self.cfg.max_length, progress)
            return {"loss": self._lm_loss(examples, progress)}

    @torch.no_grad()
    def _lm_loss(self, examples: list, progress: Callable[[int], None] | None = None) -> float:
        was = self.model.training
        self.model.eval()
        total, n = 0.0, 0
        for i in range(0, len(examples), self.cfg.eval_batch_size):
            batch = self.collate(examples[i : i + self.cfg.eval_batch_size])
            total += float(self.model(**to_device(batch, self.device)).loss) * len(batch["input_ids"])
            n += len(batch["input_ids"])
            if progress is not None:
                progress(len(batch["input_ids"]))
        self.model.train(was)
        return total / max(n, 1)

    def _after_eval(self, metrics: dict[str, Any]) -> bool:
        """Track the best state; True when early stopping says stop."""
        score = selection_score(metrics, self.cfg.select_metric)
        if self.best is None or score > self.best[0]:
            self.best = (score, self.step, _trainable_snapshot(self.model))
            self.bad_evals = 0
            return False
        self.bad_evals += 1
        return self.cfg.early_stopping_patience is not None and self.bad_evals >= self.cfg.early_stopping_patience

    # --- the loop ----------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg = self.cfg
        self._resume()
        eval_every = cfg.eval_every or max(1, self.total // 5)
        window_loss, window_tokens, t0 = 0.0, 0, time.perf_counter()
        stopped = False
        with Progress(self.total, self.step, enabled=cfg.progress and self.dist.main) as bar:
            while self.step < self.total and not stopped:
                if self.lisa is not None:
                    self.lisa.step(self.step)
                loss_val, tokens = self._train_step()
                window_loss += loss_val
                window_tokens += tokens
                self.step += 1
                lr = self.sched.get_last_lr()[0]
                elapsed = time.perf_counter() - t0
                bar.update(self.step, loss=loss_val, lr=lr, tokens_per_s=window_tokens / max(elapsed, 1e-9))
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    n = cfg.log_every if self.step % cfg.log_every == 0 else self.step % cfg.log_every
                    record = {"step": self.step, "loss": window_loss / n, "lr": lr,
                              "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                    self.log(record)
                    if not bar.interactive:  # in a terminal the bar shows these
                        bar.line(step_line(record, self.total, bar.eta(self.step)))
                    window_loss, window_tokens, t0 = 0.0, 0, time.perf_counter()
                if self.val_set and (self.step % eval_every == 0 or self.step == self.total):
                    started = time.perf_counter()
                    with bar.phase("eval", len(self.val_set)) as self.eval_progress:
                        metrics = self.evaluate(self.val_set)
                    self.eval_progress = None
                    t0 += time.perf_counter() - started  # tokens/s counts training time only
                    record = {"step": self.step, **{f"val_{k}": v for k, v in metrics.items()}}
                    self.log(record)
                    bar.line(eval_line(record, self.total))
                    stopped = self._after_eval(metrics)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total:
                    self._checkpoint()
        return self._finish(stopped)

    def _train_step(self) -> tuple[float, int]:
        cfg = self.cfg
        total_loss, tokens = 0.0, 0
        before_step(self.model, self.step, self.total, [cfg.name])  # pieces' step hooks (e.g. SpIEL regrowth)
        for micro in range(cfg.grad_accum):
            idx = self.order.indices(self.step * cfg.grad_accum + micro)
            batch = self.collate([self.train_set[i] for i in idx])
            tokens += count_tokens(batch)
            batch = to_device(batch, self.device)
            with self.precision.autocast():
                out = self.wrapped(**batch)
                task_loss = out.loss if self.loss_fn is None else self.loss_fn(out.logits, batch["labels"])
                loss = (task_loss + regularization(self.model, [cfg.name])) / cfg.grad_accum
            self.precision.backward(loss)  # scaled under fp16
            total_loss += float(loss.detach())
        stepped = self.precision.step(self.opt)
        self.opt.zero_grad(set_to_none=True)
        if stepped:  # an fp16 step skipped for inf/NaN gradients is no step: no schedule move, no pieces' hooks
            self.sched.step()
            after_optimizer_step(self.model, self.opt, self.step + 1, self.total, [cfg.name])
        return self.dist.mean(total_loss), tokens * self.dist.world

    def _checkpoint(self) -> None:
        if self.dist.main:
            progress = {"step": self.step, "bad_evals": self.bad_evals,
                        "lisa": self.lisa.state() if self.lisa is not None else None}
            save_checkpoint(self.out / f"checkpoint-{self.step}", self.model, self.cfg.name, self.opt, self.sched, progress,
                            self.precision.state())
        self.dist.barrier()

    def _finish(self, stopped: bool) -> TrainResult:
        cfg = self.cfg
        if self.best is not None and (cfg.early_stopping_patience is not None or cfg.select_metric is not None):
            with torch.no_grad():
                params = {**dict(self.model.named_buffers()), **dict(self.model.named_parameters())}
                for n, t in self.best[2].items():
                    if params[n].shape != t.shape:  # the delta changed shape since (e.g. ranks pruned in training)
                        params[n].data = t
                    else:
                        params[n].copy_(t)
        metrics: dict[str, Any] = {"steps": self.step, "early_stopped": stopped}
        if self.best is not None:
            metrics["best_step"] = self.best[1]
        if self.task == "classification" and self.splits.test:
            test = self.evaluate(self.splits.test)
            metrics.update({f"test_{k}": v for k, v in test.items()})
            self.log({"step": self.step, **{f"test_{k}": v for k, v in test.items()}})
        st = state_of(self.model)
        delta_path = self.out / "delta" if st is not None and cfg.name in st.deltas else None
        if self.dist.main:
            if delta_path is not None:
                save_delta(self.model, delta_path, name=cfg.name)
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            if cfg.plot:
                from .plot import plot_history, run_title

                model = cfg.model if self.loaded_model else type(self.model).__name__
                kind = st.deltas[cfg.name].config.kind if delta_path is not None else "custom"  # prepare= baselines
                plot_history(self.history, self.out / "training.png",
                             run_title(cfg.name, str(self.out), kind, model, self.splits.name))
        self.dist.barrier()
        return TrainResult(self.out, delta_path, self.step, metrics, self.history)
