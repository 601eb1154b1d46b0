"""The serving engine: one frozen base model, a pool of registered deltas, device slots, per-token routing and
continuous batching (docs/serving.md)."""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..core.errors import ConfigError, StateError
from ..core.targeting import head_paths, linear_types
from ..core.layouts import layout_of
from ..core.threads import torch_threads
from ..io.deferred import checks_at_exit
from . import kernel
from .pool import DeltaPool, Registered
from .routing import install_hooks, make_plan, use_plan
from .sampling import SamplingParams, generator_for, sample
from .kv import Arena
from .scheduler import Request, padded_cache, store_new
from .skeleton import meta_skeleton
from .slots import Banks, SlotTable


class Engine:
    """Serve many deltas over one frozen `model` (a decoder-only transformers model with a DynamicCache).

    `max_loaded` device slots hold deltas of rank ≤ `max_rank`; `rank_buckets` ({rank: slots}, summing to
    max_loaded) splits them so small ranks do not pay for the largest (default: all slots at max_rank).
    `host_bytes` bounds the host-memory LRU of factors. `max_batch` bounds running requests (prefilling or
    decoding), `prefill_tokens` the prompt tokens run per step (prompts longer than that are prefilled in chunks
    over several steps, so decodes are never stalled by more than one budget of prefill)."""

    def __init__(self, model: nn.Module, *, tokenizer=None, max_loaded: int = 8, max_rank: int = 16,
                 rank_buckets: dict[int, int] | None = None, host_bytes: int = 1 << 30, max_batch: int = 32,
                 prefill_tokens: int = 256) -> None:
        if rank_buckets is None:
            rank_buckets = {max_rank: max_loaded}
        if sum(rank_buckets.values()) != max_loaded or max(rank_buckets) != max_rank:
            raise ConfigError(f"rank_buckets {rank_buckets!r} must hold max_loaded={max_loaded} slots in all and "
                              f"reach max_rank={max_rank}")
        self.model, self.tokenizer = model.eval(), tokenizer
        if not isinstance(prefill_tokens, int) or prefill_tokens < 1 or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch and prefill_tokens must be whole numbers ≥ 1, got {max_batch!r}, {prefill_tokens!r}")
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        heads = head_paths(model)
        shapes = {}
        for path, module in model.named_modules():
            if isinstance(module, linear_types()) and path not in heads and not any(path.startswith(h + ".") for h in heads):
                w = layout_of(module, path, ("Linear", "Conv1D")).weight(module)
                shapes[path] = (int(w.shape[0]), int(w.shape[1]))
        self.banks = Banks(shapes, rank_buckets, self.device, self.dtype)
        self.slots = SlotTable(self.banks)
        self.pool = DeltaPool(model, meta_skeleton(model), shapes, max_rank, host_bytes, self.dtype)
        self._hooks = install_hooks(model, self.banks)
        if any(kernel.suits(self.dtype, b.rank, self.device) for b in self.banks.buckets):
            kernel.load()  # built (about 20 s) or loaded from its cache now, never inside a forward
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted: prefilling (row None) or decoding (a row of the arena)
        self.arena = Arena(max_batch)
        self.steps = 0
        self._lock = threading.RLock()
        self._callers = 0                    # threads outside the step loop waiting for the lock (`_external`)
        self._callers_lock = threading.Lock()
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        self.eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))

    # --- deltas ------------------------------------------------------------------------------------
    def register(self, name: str, path, *, convert_rank: int | None = None) -> Registered:
        """Register (or replace, for new requests) delta `name` from a native or PEFT directory; reads metadata only
        (the tensors are read once for a converted delta, to report the error, and for kinds whose update reads a
        stored value, docs/serving.md). Raises dt.load's typed errors."""
        entry = self.pool.register(name, path, convert_rank=convert_rank)  # validated without the engine's lock
        with self._external():  # old versions' slots are unreachable already (new key); freed now
            self.slots.forget(name, below=entry.version)
        return entry

    def unregister(self, name: str) -> None:
        with self._external():
            self.pool.unregister(name)
            self.slots.forget(name)

    def _load(self, entry: Registered, slot: int) -> None:
        """Disk or host cache → the slot's bank rows. A large file's hash runs in a second thread while its factors are
        built and copied in (with one torch thread meanwhile: two intra-op threads beside the hashing thread
        oversubscribe two cores, 21 vs 14.5 ms per SmolLM2 r=16 load here); a mismatch raises at the block's end,
        before the slot table records the slot as holding the delta."""
        with torch_threads(1), checks_at_exit():
            self.banks.write(slot, self.pool.factors(entry))

    def preload(self, name: str) -> int:
        """Load `name` into a slot now (pinned, then released): the hot-load path, for warming or measuring."""
        entry = self.pool.get(name)
        with self._external():
            slot = self.slots.acquire(entry.key, entry.rank, lambda s: self._load(entry, s))
            if slot is None:
                raise StateError(f"every slot that fits {name!r} (rank {entry.rank}) is pinned")
            self.slots.release(slot)
            return slot

    # --- requests ----------------------------------------------------------------------------------
    def submit(self, prompt: Iterable[int] | str, delta: str | None = None, sampling: SamplingParams | None = None,
               on_token: Callable[[Request, int], None] | None = None) -> Request:
        sampling = sampling or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("a text prompt needs the engine's tokenizer (Engine(..., tokenizer=))")
            prompt = self.tokenizer(prompt)["input_ids"]
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ConfigError("a request needs at least one prompt token")
        if sampling.stop and self.tokenizer is None:
            raise ConfigError("stop strings need the engine's tokenizer (Engine(..., tokenizer=))")
        if delta is not None:
            self.pool.get(delta)  # DeltaNameError now, not at admission
        req = Request(prompt, delta, sampling, on_token)
        req.generator = generator_for(sampling, self.device)
        with self._external():
            self.waiting.append(req)
        return req

    @contextmanager
    def _external(self) -> Iterator[None]:
        """The engine's lock for a caller outside the step loop (registry changes, preloads, submissions from other
        threads), served before the next step: `step` lets such callers go first. Python's locks are not fair — a
        thread stepping back to back re-took the lock before a waiting thread woke, and hot loads over HTTP waited
        30 s under load."""
        with self._callers_lock:
            self._callers += 1
        try:
            self._lock.acquire()
        finally:
            with self._callers_lock:
                self._callers -= 1
        try:
            yield
        finally:
            self._lock.release()

    def _let_callers_in(self, bound: float = 0.05) -> None:
        """Before a step: wait (at most `bound` seconds) while other threads wait for the lock, so they get it."""
        deadline = time.monotonic() + bound
        while self._callers and time.monotonic() < deadline:
            time.sleep(0.0002)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def run(self) -> None:
        while not self.idle:
            self.step()

    def generate(self, prompts: list, deltas: list[str | None] | None = None,
                 sampling: SamplingParams | None = None) -> list[Request]:
        reqs = [self.submit(p, d, sampling) for p, d in zip(prompts, deltas or [None] * len(prompts))]
        self.run()
        return reqs

    def close(self) -> None:
        """Remove the engine's hooks: the model is the bare base again."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # --- one step ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Cancel, plan this step's prompt chunks (admitting), decode the requests past their prompt in place,
        prefill the chunks, sample; returns the requests finished in this step."""
        self._let_callers_in()
        with self._lock:
            self.steps += 1
            finished: list[Request] = []
            for r in [r for r in self.running if r._cancel]:
                self._finish(r, "cancelled", finished)
            for r in [r for r in self.waiting if r._cancel]:
                self.waiting.remove(r)
                self._finish(r, "cancelled", finished)
            decode = [r for r in self.running if r.row is not None]
            chunks = self._plan_chunks(finished)
            if decode:
                self._decode(finished)
            if chunks:
                self._prefill(chunks, finished)
            return finished

    def _plan_chunks(self, finished: list[Request]) -> list[tuple[Request, int]]:
        """(request, prompt tokens to run now) within the step's budget: requests already prefilling first, then
        newly admitted ones (at least one chunk per step, so any prompt makes progress)."""
        budget = self.prefill_tokens
        chunks = []
        for r in self.running:
            if r.row is None and budget > 0:
                n = min(len(r.prompt) - r.length, budget)
                chunks.append((r, n))
                budget -= n
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_batch:
                break
            if req.delta is not None:
                try:
                    entry = self.pool.get(req.delta)
                    slot = self.slots.acquire(entry.key, entry.rank, lambda s, e=entry: self._load(e, s))
                except Exception as e:  # unregistered since submit, or the file went bad since registration
                    self.waiting.remove(req)
                    req.error = e
                    self._finish(req, "error", finished)
                    continue
                if slot is None:
                    continue  # every fitting slot is pinned: wait, let others pass
                req.key, req.slot = entry.key, slot
            self.waiting.remove(req)
            req.status = "running"
            self.running.append(req)
            n = min(len(req.prompt), budget)
            chunks.append((req, n))
            budget -= n
        return chunks

    def _run(self, ids: Tensor, mask: Tensor, pos: Tensor, slots: list[int], cache) -> Tensor:
        plan = make_plan(slots, self.banks, self.device)
        with use_plan(plan):
            out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                             position_ids=pos.to(self.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out

    def _decode(self, finished: list[Request]) -> None:
        """One token for every request in the arena, written in place (serve/kv.py)."""
        cache, used, lo = self.arena.cache()
        owners = self.arena.owner[:used]
        ids = torch.tensor([[r.tokens[-1] if r is not None else 0] for r in owners])
        pos = torch.tensor([[r.length if r is not None else 0] for r in owners])
        slots = [r.slot if r is not None and r.slot is not None else -1 for r in owners]
        out = self._run(ids, self.arena.mask(used, lo), pos, slots, cache)
        self.arena.advance()
        logits = out.logits[:, -1]
        for i, r in enumerate(owners):
            if r is not None:
                r.length += 1
                self._accept(r, sample(logits[i], r.sampling, r.generator), finished)

    def _prefill(self, chunks: list[tuple[Request, int]], finished: list[Request]) -> None:
        """The step's prompt chunks, left-padded, over the prefilling requests' own caches; a request whose prompt
        is done samples its first token and joins the arena (its prompt KV copied there once)."""
        from transformers import DynamicCache

        reqs = [r for r, _ in chunks]
        b = len(reqs)
        past = max(r.length for r in reqs)
        width = max(n for _, n in chunks)
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, past + width, dtype=torch.long)
        pos = torch.zeros(b, width, dtype=torch.long)
        slots = []
        for i, (r, n) in enumerate(chunks):
            ids[i, width - n:] = torch.tensor(r.prompt[r.length:r.length + n])
            mask[i, past - r.length:past] = 1
            mask[i, past + width - n:] = 1
            pos[i, width - n:] = torch.arange(r.length, r.length + n)
            slots.extend([-1] * (width - n) + [r.slot if r.slot is not None else -1] * n)
        cache = DynamicCache()
        if past:
            for layer, (k, v) in enumerate(padded_cache(reqs, past)):
                cache.update(k, v, layer)
        out = self._run(ids, mask, pos, slots, cache)
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        store_new(reqs, layers, [n for _, n in chunks], [len(r.prompt) for r in reqs])
        logits = out.logits[:, -1]
        for i, r in enumerate(reqs):
            if r.length == len(r.prompt):
                self.arena.join(r, r.kv, r.length)
                r.kv = None
                self._accept(r, sample(logits[i], r.sampling, r.generator), finished)

    def _accept(self, r: Request, token: int, finished: list[Request]) -> None:
        r.tokens.append(token)
        if r.on_token is not None:
            r.on_token(r, token)
        eos = self.eos if r.sampling.eos is None else r.sampling.eos
        if token in eos:
            return self._finish(r, "eos", finished)
        if r.sampling.stop:
            text = self.tokenizer.decode(r.tokens)
            hits = [text.find(s) for s in r.sampling.stop if s in text]
            if hits:
                r.text = text[:min(hits)]
                return self._finish(r, "stop", finished)
        if len(r.tokens) >= r.sampling.max_tokens:
            return self._finish(r, "length", finished)

    def _finish(self, r: Request, reason: str, finished: list[Request]) -> None:
        r.status, r.finish_reason = "finished", reason
        r.kv = None
        self.arena.leave(r)
        if r in self.running:
            self.running.remove(r)
        if r.slot is not None:
            self.slots.release(r.slot)
            r.slot = None
        if r.text is None and self.tokenizer is not None and reason != "error":
            r.text = self.tokenizer.decode(r.tokens)
        finished.append(r)
