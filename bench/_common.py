"""Shared helpers for the benchmarks: a random Llama, deltatune and peft LoRA on it with the same weights,
interleaved timing, and CPU memory measurement (allocator-level peak and saved activations)."""
from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- models -----------------------------------------------------------------------------------------
def build_llama(hidden: int, intermediate: int, layers: int, heads: int, vocab: int, seed: int = 0,
                **config: object) -> nn.Module:
    """A randomly initialised LlamaForCausalLM in eval mode (no download); `config` overrides LlamaConfig fields
    (e.g. num_key_value_heads, tie_word_embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                                max_position_embeddings=2048, attention_dropout=0.0, use_cache=False), **config})
    return LlamaForCausalLM(cfg).float().eval()


def with_deltatune(base: nn.Module, r: int, alpha: float, dropout: float = 0.0, dora: bool = False) -> nn.Module:
    import deltatune as dt

    return dt.attach(copy.deepcopy(base), dt.LoRA(r=r, alpha=alpha, dropout=dropout, dora=dora, targets=TARGETS))


def with_peft(base: nn.Module, r: int, alpha: float, dropout: float = 0.0, dora: bool = False) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=dora, target_modules=list(TARGETS))
    return get_peft_model(copy.deepcopy(base), cfg)


@torch.no_grad()
def randomize_and_copy(peft_model: nn.Module, ours: nn.Module, seed: int = 1) -> int:
    """Give peft's adapters random non-zero B (and perturbed DoRA magnitudes), then copy every adapter tensor
    into deltatune's pieces so both compute the same function. Returns the number of adapted modules."""
    from deltatune.runtime import slot_of

    gen = torch.Generator().manual_seed(seed)
    params = dict(peft_model.named_parameters())
    for name, p in params.items():
        if ".lora_B." in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        elif ".lora_magnitude_vector." in name:
            p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=gen).to(p.device))
    count = 0
    for path, module in ours.named_modules():
        slot = slot_of(module)
        if slot is None:
            continue
        piece = slot["default"]
        prefix = f"base_model.model.{path}"
        piece.lora_A.copy_(params[f"{prefix}.lora_A.default.weight"])
        piece.lora_B.copy_(params[f"{prefix}.lora_B.default.weight"])
        if hasattr(piece, "magnitude"):
            piece.magnitude.copy_(params[f"{prefix}.lora_magnitude_vector.default.weight"])
        count += 1
    return count


# --- timing -------------------------------------------------------------------------------------------
@dataclass
class Timing:
    seconds: list[float]
    ratios: list[float]  # per round, against the reference measured in the same round

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.seconds)

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> tuple[float, float]:
        """Interquartile range of the per-round ratios."""
        if len(self.ratios) < 4:
            return min(self.ratios), max(self.ratios)
        q = statistics.quantiles(self.ratios, n=4)
        return q[0], q[2]


def interleaved(fns: dict[str, Callable[[], object]], reference: str, rounds: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time every fn once per round, in a rotating order, for `rounds` rounds after `warmup` untimed rounds.

    The ratio of a variant is the median over rounds of (its time / the reference's time in that round), so
    slow drifts of a noisy machine cancel out.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = clock()
            fns[name]()
            seconds[name].append(clock() - t0)
    ref = seconds[reference]
    return {n: Timing(s, [a / b for a, b in zip(s, ref)]) for n, s in seconds.items()}


def synchronized(fns: dict[str, Callable[[], object]], device: torch.device) -> dict[str, Callable[[], object]]:
    """On a GPU, each fn waits for its kernels to finish, so a wall clock around it times the work, not the launch."""
    if device.type != "cuda":
        return fns

    def wrap(f: Callable[[], object]) -> Callable[[], object]:
        def g() -> object:
            out = f()
            torch.cuda.synchronize(device)
            return out
        return g
    return {name: wrap(f) for name, f in fns.items()}


def cuda_peak(fn: Callable[[], object], setup: Callable[[], object] | None, device: torch.device) -> tuple[int, int]:
    """(bytes allocated on the GPU when `fn` starts, peak bytes allocated while it runs above that), from the CUDA
    caching allocator's own statistics (`torch.cuda.max_memory_allocated`)."""
    if setup is not None:
        setup()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return before, torch.cuda.max_memory_allocated(device) - before


# --- memory -------------------------------------------------------------------------------------------
def storage_bytes(tensors: Iterable[Tensor], device_type: str = "cpu") -> int:
    """Bytes of the distinct storages behind `tensors` on `device_type` (views and shared weights counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type == device_type:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def live_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, *extra: Tensor) -> list[Tensor]:
    """Every tensor that exists before a step starts: parameters, buffers, grads, optimizer state, inputs."""
    out: list[Tensor] = [*model.parameters(), *model.buffers(), *extra]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if optimizer is not None:
        for state in optimizer.state.values():
            out += [v for v in state.values() if isinstance(v, Tensor)]
    return out


def allocator_peak(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> tuple[int, str]:
    """Peak of CPU tensor memory allocated while `fn` runs, above what was allocated when it started, in bytes,
    and the name of the operator whose allocation reached it.

    `setup()` then `fn()` run under torch.profiler(profile_memory=True), which records every allocation and
    free of the c10 CPU allocator (all tensor storages, including temporaries inside kernels, the autograd
    engine and the optimizer). The answer is the maximum of the running sum of those events during `fn`,
    minus the running sum when `fn` starts. The profiler cannot size frees of blocks allocated before it
    started, so `setup` should run one whole step first: then everything `fn` frees was allocated inside
    the session (parameters, buffers, optimizer state and inputs are never freed by a step).
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        if setup is not None:
            setup()
        with record_function("deltatune_bench_measured"):
            fn()
    events: list[tuple[int, int, str]] = []
    window = None
    stack = [(node, "") for node in prof.profiler.kineto_results.experimental_event_tree()]
    while stack:
        node, parent = stack.pop()
        stack.extend((child, node.name) for child in node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, parent))
        elif node.name == "deltatune_bench_measured":
            window = (node.start_time_ns, node.end_time_ns)
    if window is None:
        raise RuntimeError("the profiler recorded no measured region")
    events.sort(key=lambda ev: ev[0])
    run, start, peak, where = 0, None, 0, ""
    for t, nbytes, op in events:
        if start is None and t >= window[0]:
            start = peak = run
        run += nbytes
        if start is not None and t <= window[1] and run > peak:
            peak, where = run, op
    return (0, "") if start is None else (peak - start, where)


def saved_activation_bytes(fn: Callable[[], object], exclude: Iterable[Tensor], device_type: str = "cpu") -> int:
    """Bytes of the distinct storages on `device_type` that autograd saves for backward while `fn` runs, leaving
    out `exclude` (the model's parameters and buffers: they are kept anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        if t.device.type == device_type:
            s = t.untyped_storage()
            if s.data_ptr() not in skip:
                seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
