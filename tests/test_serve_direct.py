"""The engine's hot load: the direct path (factors copied out of their byte ranges in a native file) against the full
read, the checks it keeps (hash, finiteness, a file changed since registration), and the deferred hash checks it
relies on (io/deferred.py)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import deltatune as dt
from deltatune.errors import CorruptFileError, NonFiniteError
from deltatune.io import deferred, safetensors_io
from deltatune.io.delta import Delta
from deltatune.serve import Engine, SamplingParams
from deltatune.serve import pool as pool_module
from deltatune.serve.direct import read_direct
from test_serve import build_base, make_lora, reference, require_kernel, spy_on_kernel


@pytest.fixture(scope="module")
def base():
    return build_base()


def bank_rows(eng: Engine, slot: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {p: tuple(t.clone() for t in eng.banks.factors(p, slot)) for p in eng.banks.shapes}


@pytest.mark.parametrize("beside", [True, False])
def test_direct_load_equals_the_full_read(base, tmp_path, monkeypatch, beside):
    """Bank rows written by the direct path equal those of the full read (Delta.read + update) bit for bit, for a
    rank below the bucket's (zeroed tail) and with alpha ≠ r (a scale to fold in)."""
    monkeypatch.setattr(safetensors_io, "HASH_BESIDE_BYTES", 0 if beside else 1 << 62)
    monkeypatch.setattr(safetensors_io, "READ_PIECE_BYTES", 1000)  # beside: read and hashed in many pieces
    path = make_lora(base, tmp_path / "d", 4, 1, alpha=12)
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=8)
    entry = eng.register("d", path)
    assert entry.info.direct is not None
    direct = bank_rows(eng, eng.preload("d"))
    calls = []
    monkeypatch.setattr(pool_module, "read_direct", lambda *a: calls.append(a))  # None: the full read
    full = Engine(copy.deepcopy(base), max_loaded=2, max_rank=8)
    full.register("d", path)
    rows = bank_rows(full, full.preload("d"))
    assert calls and set(rows) == set(direct)
    assert all(torch.equal(direct[p][0], rows[p][0]) and torch.equal(direct[p][1], rows[p][1]) for p in rows)
    delta = Delta.read(path)
    some = next(iter(delta.state))
    dw = delta.update(some)[0]
    assert dw.scale == 3.0 and torch.equal(direct[some][1][:, :4], dw.B * 3.0) and not direct[some][0][4:].any()


def test_files_of_one_recipe_share_one_layout_and_other_kinds_have_no_plan(base, tmp_path):
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=16)
    a = eng.register("a", make_lora(base, tmp_path / "a", 8, 1))
    b = eng.register("b", make_lora(base, tmp_path / "b", 8, 2))
    assert a.info.direct.layout is b.info.direct.layout and a.info.direct.sha256 != b.info.direct.sha256
    peft = eng.register("p", dt.save(dt.load(copy.deepcopy(base), tmp_path / "a"), tmp_path / "peft", format="peft"))
    assert peft.info.direct is None and eng.preload("p") >= 0  # another format: the full read
    paths = {}
    for name, cfg in (("vera", dt.VeRA(r=8, targets=("q_proj", "v_proj"))),
                      ("randlora", dt.RandLoRA(r=8, targets=("q_proj", "v_proj")))):
        m = copy.deepcopy(base)
        dt.attach(m, cfg, name=name)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lambda" in n:
                    p.normal_(0, 0.5)
        paths[name] = dt.save(m, tmp_path / name)
    # their updates read the saved shape, which meta tensors do not hold: computed from the tensors, once
    vera = eng.register("vera", paths["vera"])
    assert vera.policy == "fast" and vera.info.direct is None  # factors computed from what is stored
    [r] = eng.generate([[3, 9, 4]], ["vera"], SamplingParams(max_tokens=5, eos=()))
    assert r.tokens == reference(base, paths["vera"], [3, 9, 4], 5)
    rand = eng.register("randlora", paths["randlora"], convert_rank=16)  # a sum of full-rank bases: converted
    assert rand.policy == "converted" and 0 <= rand.error < 1 and eng.preload("randlora") >= 0


@pytest.mark.parametrize("beside", [True, False])
def test_a_changed_file_is_refused_and_the_slot_stays_empty(base, tmp_path, monkeypatch, beside):
    """Same size, one value changed after registration (delta.json untouched): the hash refuses it; nothing is
    cached, no slot holds it, and torch's thread count is restored."""
    monkeypatch.setattr(safetensors_io, "HASH_BESIDE_BYTES", 0 if beside else 1 << 62)
    monkeypatch.setattr(safetensors_io, "READ_PIECE_BYTES", 1000)  # beside: read and hashed in many pieces
    path = make_lora(base, tmp_path / "d", 4, 1)
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=8)
    eng.register("d", path)
    weights = path / "delta.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4)
    before = weights.stat()
    with open(weights, "r+b") as f:  # same inode and size; the old mtime put back: only the hash can tell
        f.write(bytes(data))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    direct = []
    monkeypatch.setattr(pool_module, "read_direct", lambda *a: direct.append(read_direct(*a)) or direct[-1])
    threads = torch.get_num_threads()
    with pytest.raises(CorruptFileError, match="SHA-256"):
        eng.preload("d")
    assert direct and direct[0] is not None  # the direct path read it (the hash, not the stamp, refused it)
    assert eng.slots.where == {} and eng.pool.host_cached == [] and torch.get_num_threads() == threads


def test_a_replaced_directory_takes_the_full_read(base, tmp_path):
    """Re-saved under the same path (another delta, same recipe): the registration's plan no longer matches the
    directory, so the full read serves what is there now."""
    path = make_lora(base, tmp_path / "d", 4, 1)
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=8)
    entry = eng.register("d", path)
    make_lora(base, tmp_path / "d", 4, 2)
    assert pool_module.read_direct(path, entry.info.direct) is None
    rows = bank_rows(eng, eng.preload("d"))
    some = next(iter(rows))
    now = Delta.read(path).update(some)[0]
    assert torch.equal(rows[some][1][:, :4], now.B * now.scale) and torch.equal(rows[some][0][:4], now.A)


def test_non_finite_factors_are_refused_and_an_overflowing_sum_is_not(base, tmp_path):
    path = make_lora(base, tmp_path / "d", 4, 1)
    delta = Delta.read(path)
    some = next(iter(delta.state))
    delta.state[some]["lora_B"][0, 0] = float("nan")
    nan = delta.write(tmp_path / "nan")
    delta.state[some]["lora_B"][0, 0] = 0.0
    for st in delta.state.values():  # every value finite, their sum not
        st["lora_B"].fill_(1e37)  # × scale 4 stays finite; thousands of them do not
    big = delta.write(tmp_path / "big")
    eng = Engine(copy.deepcopy(base), max_loaded=2, max_rank=8)
    eng.register("nan", nan)
    eng.register("big", big)
    with pytest.raises(NonFiniteError, match=f"{some}.lora_B"):
        eng.preload("nan")
    assert eng.slots.where == {}
    slot = eng.preload("big")
    assert bool(torch.isfinite(eng.banks.factors(some, slot)[1]).all())


def test_checks_at_exit_defers_settles_and_prefers_a_failed_check():
    seen = []

    def failing() -> None:
        seen.append("check")
        raise CorruptFileError("hash mismatch")

    deferred.settle(lambda: seen.append("now"))
    deferred.after_checks(lambda: seen.append("published now"))
    assert seen == ["now", "published now"]
    seen.clear()
    with deferred.checks_at_exit():
        deferred.settle(lambda: seen.append("later"))
        deferred.after_checks(lambda: seen.append("published"))
        assert seen == []
    assert seen == ["later", "published"]
    seen.clear()
    with pytest.raises(CorruptFileError, match="hash mismatch"):  # in preference to the block's own error
        with deferred.checks_at_exit():
            deferred.settle(failing)
            deferred.settle(lambda: seen.append("still run"))
            deferred.after_checks(lambda: seen.append("published"))
            raise ValueError("what the copy made of a changed file")
    assert seen == ["check", "still run"]
    seen.clear()
    with pytest.raises(ValueError):
        with deferred.checks_at_exit():
            deferred.settle(lambda: seen.append("passed"))
            deferred.after_checks(lambda: seen.append("published"))
            raise ValueError("the block's own error")
    assert seen == ["passed"]


def test_the_arena_moves_its_columns_in_place_when_wide_enough():
    """When the column pointer reaches the arena's end and the live columns fit, they move left within the same
    tensors (no new arena, so nothing for the heap to keep); every live row's keys and values are kept."""
    from deltatune.serve.kv import Arena

    class Req:
        row = None

    torch.manual_seed(0)
    arena = Arena(rows=2)
    first, second = Req(), Req()
    prompt = [(torch.randn(2, 5, 4), torch.randn(2, 5, 4))]  # one layer: 2 kv heads, 5 positions, head dim 4
    arena.join(first, prompt, 5)
    written = {id(first): [prompt[0][0][:, i] for i in range(5)]}
    k0, cols = arena.k[0], arena.cols
    steps = 0
    while arena.moves == 0:
        cache, used, lo = arena.cache()
        new = torch.randn(used, 2, 1, 4)
        cache.layers[0].update(new, new.clone())
        for row, req in enumerate(arena.owner[:used]):
            if req is not None:
                written[id(req)].append(new[row, :, 0])
        arena.advance()
        steps += 1
        if steps == cols - 7:  # two columns before the end: the second joins with 2 positions, the first leaves
            arena.join(second, prompt, 2)
            written[id(second)] = [prompt[0][0][:, i] for i in range(2)]
            arena.leave(first)
    assert arena.k[0] is k0 and arena.cols == cols and arena.moves == 1
    row, start = second.row, arena.start[second.row]
    kept = arena.k[0][row, :, start:arena.cur]
    assert torch.equal(kept, torch.stack(written[id(second)], 1))


def test_other_threads_get_the_engine_between_steps(base, tmp_path):
    """While a thread steps the engine back to back (a server's engine thread under load), a registration, preload
    or unregistration from another thread gets the engine's lock after the step in progress (one more if it was not
    scheduled within the step loop's 50 ms of waiting) — not after
    whichever step the lock happens to be free at (Python's locks are not fair: 63 steps were seen)."""
    import threading
    from contextlib import contextmanager

    eng = Engine(copy.deepcopy(base), max_loaded=4, max_rank=8, max_batch=4)
    paths = [make_lora(base, tmp_path / f"d{i}", 4, i) for i in range(3)]
    for i in range(4):
        eng.submit([3, 9, 4, i + 1], None, SamplingParams(max_tokens=10_000, eos=()))
    waits = []
    external = eng._external

    @contextmanager
    def measured():
        before = eng.steps
        with external():
            waits.append(eng.steps - before)
            yield

    eng._external = measured
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            eng.step()

    stepper = threading.Thread(target=loop)
    stepper.start()
    try:
        for i in range(30):
            eng.register(f"n{i}", paths[i % 3])
            eng.preload(f"n{i}")
            eng.unregister(f"n{i}")
    finally:
        stop.set()
        stepper.join()
    assert len(waits) == 90 and max(waits) <= 2, f"steps run while a call waited for the lock: {sorted(waits)[-10:]}"


@pytest.mark.parametrize("slots", [[3, -1, 0, 0, 2, 3, 3, 1, -1, 2], [1, 0, 0, 1, 1, 1, 0, 0, 1, 0]],
                         ids=["mixed", "every-token-one-bucket"])
@pytest.mark.parametrize("path", ["gathered", "row-sums", "kernel", "kernel-refused"])
def test_every_routing_path_matches_a_per_token_reference(monkeypatch, path, slots):
    """Gathered slots + batched matmuls (long segments), per-token row sums (short segments) and the compiled kernel
    (every segment length) each give, for every token, out + scale · B_s A_s x of its own slot (ranks 2 and 5 in
    buckets of 4 and 8; tokens without a slot and padded segments untouched) — against a loop over tokens; also when
    every token of the forward has a slot in one bucket (the row sums then add in the forward's own order, without
    selecting). A plan made for the kernel whose tensors the kernel then refuses ("kernel-refused") takes the torch
    ops it also planned."""
    from deltatune.serve import routing
    from deltatune.serve.slots import Banks

    bag_below = 1000 if path == "row-sums" else 0  # the kernel, where it runs, takes every segment length
    monkeypatch.setattr(routing, "BAG_BELOW", bag_below)
    monkeypatch.setattr(routing, "KERNEL", path.startswith("kernel"))
    if path.startswith("kernel"):
        require_kernel()
        calls = spy_on_kernel(monkeypatch, refuse=path == "kernel-refused")
    torch.manual_seed(0)
    shapes = {"m": (6, 5)}
    banks = Banks(shapes, {4: 2, 8: 2}, torch.device("cpu"), torch.float64)
    factors = {}
    for slot, r in enumerate([2, 4, 5, 8]):
        a, b, scale = torch.randn(r, 5, dtype=torch.float64), torch.randn(6, r, dtype=torch.float64), 0.5 + slot
        banks.write(slot, {"m": (a, b, scale)})
        factors[slot] = (a, b, scale)
    x = torch.randn(2, 5, 5, dtype=torch.float64)
    out = torch.randn(2, 5, 6, dtype=torch.float64)
    expect = out.clone().view(-1, 6)
    for t, s in enumerate(slots):
        if s >= 0:
            a, b, scale = factors[s]
            expect[t] += scale * b @ (a @ x.view(-1, 5)[t])
    got = routing.low_rank_add(banks, "m", x, out.clone(), routing.make_plan(slots, banks, torch.device("cpu")))
    assert torch.allclose(got.view(-1, 6), expect, atol=1e-12)
    plan = routing.make_plan(slots, banks, torch.device("cpu"))
    assert all((g.token_rows is not None) == (path == "row-sums") for g in plan.groups)
    assert all((g.by_slot is not None) == path.startswith("kernel") for g in plan.groups)
    one_bucket = min(slots) >= 0 and len({banks.locate(s)[0] for s in slots}) == 1
    assert any(g.tokens is None for g in plan.groups) == (path == "row-sums" and one_bucket)
    if path == "kernel":  # the kernel ran, for every bucket
        assert calls and all(c is not None for c in calls)
    if path == "kernel-refused":
        assert calls


@pytest.mark.parametrize("rank", [3, 16, 32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_routing_kernel_equals_matmuls_for_every_width(rank, dtype):
    """Widths that are and are not multiples of the kernel's blocks (in 37 and 64; out 70 and 96), ranks of the
    templated and general loops up to the largest it takes, x and out as views into wider tensors (row strides
    other than their widths), 40 tokens over 7 bank rows in an unsorted order, 3 tokens left out: each listed
    token gets x·Aᵀ[s]·Bᵀ[s] added, the others stay as they were."""
    k = require_kernel()
    g = torch.Generator().manual_seed(rank)
    for width_in, width_out in ((37, 70), (64, 96)):
        at = torch.randn(7, width_in, rank, generator=g, dtype=dtype)
        bt = torch.randn(7, rank, width_out, generator=g, dtype=dtype)
        x = torch.randn(40, width_in + 5, generator=g, dtype=dtype)[:, 3:3 + width_in]
        out = torch.randn(40, width_out + 9, generator=g, dtype=dtype)[:, 2:2 + width_out]
        assert x.stride(0) != width_in and out.stride(0) != width_out
        tokens = torch.randperm(40, generator=g)[:37]
        rows = torch.randint(0, 7, (37,), generator=g)
        expect = out.clone()
        expect[tokens] += torch.einsum("ti,tir,tro->to", x[tokens], at[rows], bt[rows])
        k.grouped_low_rank_add(x, out, at, bt, rows, tokens)
        tol = 1e-12 if dtype == torch.float64 else 2e-4
        assert torch.allclose(out, expect, rtol=tol, atol=tol * rank)


def test_buckets_the_kernel_cannot_take_are_planned_for_torch_ops(monkeypatch):
    """A bucket above the kernel's largest rank, or half-precision banks, get no kernel order: torch ops route them
    (and the kernel takes the other buckets of the same forward)."""
    from deltatune.serve import kernel, routing
    from deltatune.serve.slots import Banks

    require_kernel()
    monkeypatch.setattr(routing, "KERNEL", True)
    banks = Banks({"m": (6, 5)}, {8: 1, kernel.MAX_RANK + 1: 1}, torch.device("cpu"), torch.float32)
    plan = routing.make_plan([0, 1, 1, -1], banks, torch.device("cpu"))
    assert [g.by_slot is not None for g in plan.groups] == [True, False]
    half = Banks({"m": (6, 5)}, {8: 2}, torch.device("cpu"), torch.bfloat16)
    assert all(g.by_slot is None for g in routing.make_plan([0, 1], half, torch.device("cpu")).groups)


def test_without_the_kernel_the_engine_warns_once_and_routes_with_torch_ops(monkeypatch):
    """DELTATUNE_KERNEL=0 (as a failed build): load() warns once with the reason and returns None from then on."""
    from deltatune.serve import kernel

    monkeypatch.setattr(kernel, "_STATE", {})
    monkeypatch.setenv("DELTATUNE_KERNEL", "0")
    with pytest.warns(UserWarning, match="DELTATUNE_KERNEL=0"):
        assert kernel.load() is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.load() is None and not kernel.loaded()  # no second warning


def test_the_routing_kernel_refuses_bad_indices_and_changes_nothing():
    """Rows outside the bank, tokens outside x, a token listed twice, mixed dtypes, wrong shapes, output rows that
    share memory, a rank above 256: each a clear error before anything is added."""
    k = require_kernel()
    at, bt = torch.randn(3, 5, 3), torch.randn(3, 3, 6)
    x, out = torch.randn(4, 5), torch.randn(4, 6)
    keep = out.clone()
    long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    for rows, tokens, match in (([0, 3], [0, 1], "bank row 3"), ([0, -1], [0, 1], "bank row -1"),
                                ([0, 1], [0, 4], "token 4"), ([0, 1], [2, 2], "listed twice")):
        with pytest.raises(RuntimeError, match=match):
            k.grouped_low_rank_add(x, out, at, bt, long(rows), long(tokens))
        assert torch.equal(out, keep)
    with pytest.raises(RuntimeError, match="one dtype"):
        k.grouped_low_rank_add(x.double(), out, at, bt, long([0]), long([0]))
    with pytest.raises(RuntimeError, match="shapes"):
        k.grouped_low_rank_add(torch.randn(4, 6), out, at, bt, long([0]), long([0]))
    with pytest.raises(RuntimeError, match="overlap"):  # rows of out sharing memory: threads would race
        k.grouped_low_rank_add(x, torch.zeros(6).expand(4, 6), at, bt, long([0, 1]), long([0, 1]))
    with pytest.raises(RuntimeError, match="rank 1..256"):
        k.grouped_low_rank_add(x, out, torch.zeros(3, 5, 257), torch.zeros(3, 257, 6), long([0]), long([0]))
    assert torch.equal(out, keep)
    k.grouped_low_rank_add(x, out, at, bt, long([2, 0]), long([3, 1]))  # and a good call adds exactly its tokens
    expect = keep.clone()
    expect[3] += x[3] @ at[2] @ bt[2]
    expect[1] += x[1] @ at[0] @ bt[0]
    assert torch.allclose(out, expect, atol=1e-5) and torch.equal(out[[0, 2]], keep[[0, 2]])


def test_read_buffers_of_dropped_entries_are_reused_and_nothing_kept_is_overwritten(base, tmp_path, monkeypatch):
    """A direct read whose factors are not kept (or are evicted) hands its buffer to the next read: the next delta
    reads into it (no fresh pages), its slot gets its own factors, and the entries still cached are untouched."""
    paths = [make_lora(base, tmp_path / f"d{i}", 4, i) for i in range(4)]
    size = Delta.read(paths[0]).num_params * 4
    eng = Engine(copy.deepcopy(base), max_loaded=4, max_rank=8, host_bytes=2 * size)  # room for two entries
    for i, p in enumerate(paths):
        eng.register(f"d{i}", p)
    fresh = []
    original = torch.empty
    monkeypatch.setattr(pool_module.torch, "empty",
                        lambda *a, **k: (k.get("dtype") is torch.uint8 and fresh.append(a)) or original(*a, **k))
    for i in range(4):
        slot = eng.preload(f"d{i}")
        rows = bank_rows(eng, slot)
        for mpath, dw in ((m, Delta.read(paths[i]).update(m)[0]) for m in Delta.read(paths[i]).state):
            assert torch.equal(rows[mpath][0][:4], dw.A) and torch.equal(rows[mpath][1][:, :4], dw.B * dw.scale)
    assert len(fresh) == 3  # d0, d1 fill the cache, d2 evicts d0 (fresh: d0's buffer is spare only after d2's load)
    assert eng.pool.host_cached == [("d2", 1), ("d3", 1)]
    for name, i in (("d2", 2), ("d3", 3)):  # what is cached still equals its file
        cached = eng.pool.factors(eng.pool.get(name))
        some = next(iter(cached))
        assert torch.equal(cached[some][0], Delta.read(paths[i]).update(some)[0].A)


@pytest.mark.parametrize("factors, bank", [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
                         ids=["fp32-into-bf16", "fp16-into-fp32"])
def test_the_scale_is_folded_into_b_in_the_wider_dtype_and_rounded_once(factors, bank):
    """Bᵀ = scale · B computed in the wider of the factors' and the bank's dtypes, then stored: one rounding (a
    bf16 bank gets round(scale · B), not round(scale · round(B)); fp16 factors are scaled in fp32)."""
    from deltatune.serve.slots import Banks

    torch.manual_seed(0)
    banks = Banks({"m": (64, 48)}, {8: 1}, torch.device("cpu"), bank)
    a, b = torch.randn(5, 48, dtype=factors), torch.randn(64, 5, dtype=factors)
    banks.write(0, {"m": (a, b, 0.37)})
    got_a, got_b = banks.factors("m", 0)
    wide = torch.promote_types(factors, bank)
    assert torch.equal(got_b[:, :5], (b.to(wide) * 0.37).to(bank)) and not got_b[:, 5:].any()
    assert torch.equal(got_a[:5], a.to(bank))
    if bank == torch.bfloat16:  # rounding twice differs somewhere in 320 values
        assert not torch.equal(got_b[:, :5], (b.to(bank) * 0.37).to(bank))


def test_a_read_failing_midway_leaves_no_hashing_thread(base, tmp_path, monkeypatch):
    """The file ends while its pieces are read (and hashed as they arrive): the error is raised only after the
    hashing thread finished — no thread outlives the read, even when hashing lags behind it."""
    import threading
    import time

    monkeypatch.setattr(safetensors_io, "HASH_BESIDE_BYTES", 0)
    monkeypatch.setattr(safetensors_io, "READ_PIECE_BYTES", 1000)
    arriving = safetensors_io._arriving

    def slow(head, pieces):  # a hash that lags: without the join it is still running when the error is raised
        for piece in arriving(head, pieces):
            time.sleep(0.02)
            yield piece

    monkeypatch.setattr(safetensors_io, "_arriving", slow)
    reads = []
    pread = safetensors_io._pread

    def failing(fd, offset, into, where):
        reads.append(offset)
        if len(reads) == 5:  # length, header, two pieces, then the file "ends"
            raise CorruptFileError(f"{where} ended while being read")
        return pread(fd, offset, into, where)

    monkeypatch.setattr(safetensors_io, "_pread", failing)
    weights = make_lora(base, tmp_path / "d", 4, 1) / "delta.safetensors"
    with pytest.raises(CorruptFileError, match="ended"):
        safetensors_io.read_data(weights, size=weights.stat().st_size, sha256="0" * 64)
    assert len(reads) == 5
    assert not [t for t in threading.enumerate() if t.name == "deltatune-sha256"]
