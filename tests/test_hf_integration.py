"""transformers integration: same model object, state_dict keys, generate(), an unmodified Trainer, checkpointing."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import deltatune as dt
from deltatune.runtime import slot_of, state_of

VOCAB = 64


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def pieces(model: nn.Module, name: str) -> dict[str, nn.Module]:
    return {p: slot_of(m)[name] for p, m in model.named_modules() if slot_of(m) is not None and name in slot_of(m)}


def randomize(model: nn.Module, name: str, std: float = 0.3, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for piece in pieces(model, name).values():
            piece.lora_B.copy_(torch.randn(piece.lora_B.shape, generator=gen) * std)


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "deltatune" not in k}


# --- the model object and its state_dict -----------------------------------------------------------------
def test_same_object_and_state_dict_keys():
    m = tiny_llama()
    keys = list(m.state_dict())
    values = base_tensors(m)
    ids = {n: id(p) for n, p in m.named_parameters()}
    cls = type(m)
    out = dt.attach(m, dt.LoRA(r=4, targets=("q_proj", "v_proj")), "math")
    dt.attach(m, dt.LoRA(r=2, targets=("down_proj",)), "code", activate=False)
    assert out is m and type(m) is cls
    assert isinstance(m.model.layers[0].self_attn.q_proj, nn.Linear)
    with_delta = list(m.state_dict())
    assert [k for k in with_delta if "deltatune" not in k] == keys  # same keys, same order
    extra = sorted(set(with_delta) - set(keys))
    assert extra == sorted(
        [f"model.layers.{i}.self_attn.{p}.deltatune.math.lora_{ab}" for i in range(2) for p in ("q_proj", "v_proj")
         for ab in "AB"]
        + [f"model.layers.{i}.mlp.down_proj.deltatune.code.lora_{ab}" for i in range(2) for ab in "AB"])
    for k, v in base_tensors(m).items():
        assert torch.equal(v, values[k])
    assert {n: id(p) for n, p in m.named_parameters() if "deltatune" not in n} == ids
    # loading the base's own state_dict into the attached model works (strict on base keys)
    missing, unexpected = m.load_state_dict(values, strict=False)
    assert unexpected == [] and all("deltatune" in k for k in missing)
    dt.detach(m, "math")
    dt.detach(m, "code")
    assert list(m.state_dict()) == keys and state_of(m) is None
    assert all(p.requires_grad for p in m.parameters())


def test_unload_merged_then_save_pretrained(tmp_path):
    """unload(merge_active=True) leaves a plain HF model that save_pretrained / from_pretrained round-trip."""
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=4), "d")
    randomize(m, "d")
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        want = m(ids).logits
    dt.unload(m, merge_active=True)
    assert not any("deltatune" in k for k in m.state_dict())
    m.save_pretrained(tmp_path / "merged")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, want, atol=1e-5)


def test_deepcopy_is_independent():
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=4), "d")
    randomize(m, "d")
    ids = torch.randint(3, VOCAB, (1, 6))
    c = copy.deepcopy(m)
    with torch.no_grad():
        assert torch.equal(c(ids).logits, m(ids).logits)
        want = m(ids).logits
        dt.detach(c, "d")  # must not touch the original
        assert torch.equal(m(ids).logits, want)
        assert "d" in state_of(m).deltas and len(pieces(m, "d")) == 14
        assert not torch.allclose(c(ids).logits, want)


# --- generate -----------------------------------------------------------------------------------------------
def _generate(model: nn.Module, prompt: torch.Tensor, n: int = 6):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, use_cache=True, return_dict_in_generate=True, output_logits=True,
                         pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


def test_generate_with_delta_equals_merged_and_reference():
    prompt = torch.tensor([[1, 17, 33, 5, 60, 12], [1, 40, 41, 42, 9, 3]])
    m = tiny_llama()
    with torch.no_grad():
        base_seq, base_logits = _generate(m, prompt)
    dt.attach(m, dt.LoRA(r=4, alpha=8), "d")
    randomize(m, "d", std=0.5)
    with torch.no_grad():
        seq, logits = _generate(m, prompt)
        # a reference model: a fresh copy of the base with ΔW = s·B·A added to each weight by hand
        ref = tiny_llama()
        for path, piece in pieces(m, "d").items():
            ref.get_submodule(path).weight += piece.scale * piece.lora_B @ piece.lora_A
        ref_seq, ref_logits = _generate(ref, prompt)
        dt.merge(m, "d")
        merged_seq, merged_logits = _generate(m, prompt)
        dt.unmerge(m, "d")
        again_seq, again_logits = _generate(m, prompt)
        with dt.active(m, None):
            bare_seq, _ = _generate(m, prompt)
    assert seq.shape == (2, prompt.shape[1] + 6)
    assert not torch.equal(seq, base_seq), "the delta should change what is generated"
    assert not torch.allclose(logits, base_logits, atol=1e-2)
    assert torch.equal(seq, merged_seq) and torch.equal(seq, ref_seq) and torch.equal(seq, again_seq)
    assert torch.allclose(logits, merged_logits, atol=1e-4)
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert torch.allclose(logits, again_logits, atol=1e-5)
    assert torch.equal(bare_seq, base_seq)


def test_generate_cache_matches_full_forward():
    """Incremental decoding with the KV cache gives the same next-token logits as a full forward pass."""
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=4, targets=("k_proj", "v_proj", "o_proj")), "d")
    randomize(m, "d", std=0.5)
    prompt = torch.tensor([[1, 7, 8, 9, 10]])
    with torch.no_grad():
        seq, logits = _generate(m, prompt, n=4)
        full = m(seq).logits[:, prompt.shape[1] - 1: -1]
    assert torch.allclose(logits, full, atol=1e-4)


# --- an unmodified Trainer --------------------------------------------------------------------------------
def test_trainer_trains_only_the_delta_and_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(3, VOCAB, (4, 16), generator=gen)
    data = [{"input_ids": s, "labels": s, "attention_mask": torch.ones_like(s)} for s in seqs] * 16

    def loss(model):
        model.eval()
        with torch.no_grad():
            return model(input_ids=seqs, labels=seqs).loss.item()

    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=8, alpha=32), "d")
    base_before = base_tensors(m)
    delta_before = {k: v.detach().clone() for k, v in m.state_dict().items() if "deltatune" in k}
    loss_before = loss(m)

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=30, learning_rate=1e-2,
                             per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=10, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=m, args=args, train_dataset=data)
    trainer.train()
    assert trainer.model is m
    loss_after = loss(m)
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert logged[-1] < logged[0]

    for k, v in base_tensors(m).items():
        assert torch.equal(v, base_before[k]), f"base tensor {k} changed during training"
    for k, v in m.state_dict().items():
        if "deltatune" in k and k.endswith("lora_B"):
            assert not torch.equal(v, delta_before[k]), f"{k} did not train"
    assert dt.summary(m)["d"].trainable == sum(v.numel() for v in delta_before.values())

    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        want = m(ids).logits
    dt.save(m, tmp_path / "delta", "d")
    fresh = tiny_llama()
    dt.load(fresh, tmp_path / "delta")
    with torch.no_grad():
        got = fresh(ids).logits
        with dt.active(fresh, None):
            bare = fresh(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(bare, want, atol=1e-2)
    assert loss(fresh) == pytest.approx(loss_after, abs=1e-5)


# --- gradient checkpointing --------------------------------------------------------------------------------
def _grads(checkpointing: dict | None, dropout: float, dora: bool = False):
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=4, dropout=dropout, dora=dora), "d")
    randomize(m, "d", std=0.1)
    calls = []
    m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda mod, args: calls.append(1))
    if checkpointing is not None:
        enable = getattr(m, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs=checkpointing)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    m.train()
    ids = torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the same dropout masks in both runs
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    base_grads = [n for n, p in m.named_parameters() if not p.requires_grad and p.grad is not None]
    return out.loss.detach(), grads, len(calls), base_grads


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_gradient_checkpointing_same_grads(dropout, reentrant, dora):
    """Same loss and grads with checkpointing on and off; with dropout the recomputation must redraw the same masks."""
    loss0, g0, calls0, base0 = _grads(None, dropout, dora)
    loss1, g1, calls1, base1 = _grads({"use_reentrant": reentrant}, dropout, dora)
    assert calls0 == 1 and calls1 == 2, "checkpointing should recompute the layer in backward"
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and all("deltatune" in n for n in g0)
    for n in g0:
        assert g0[n] is not None and g1[n] is not None, n
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), n
    assert any(g.abs().sum() > 0 for g in g0.values())
    assert base0 == [] and base1 == []


# --- save_pretrained with deltas attached; DeltaCallback checkpoints and resume -------------------------------
def _file_keys(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_save_pretrained_writes_the_base_only_and_says_how_to_save_deltas(tmp_path, caplog):
    m = tiny_llama()
    own = set(m._keys_to_ignore_on_save)
    base_keys = set(m.state_dict())
    dt.attach(m, dt.LoRA(r=4), "d")
    randomize(m, "d")
    ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        want, bare = m(ids).logits, tiny_llama()(ids).logits
    assert any("deltatune" in k for k in m.state_dict())  # the state_dict keeps the delta keys
    copied = copy.deepcopy(m)  # copying does not warn, and the copy saves the same way
    assert not caplog.records
    with caplog.at_level("WARNING", logger="deltatune"):
        m.save_pretrained(tmp_path / "ckpt")
    warned = [r.getMessage() for r in caplog.records if r.name == "deltatune"]
    assert len(warned) == 1 and "'d'" in warned[0] and "dt.save" in warned[0], warned
    assert _file_keys(tmp_path / "ckpt") == base_keys  # the base's keys, no delta key
    dt.save(m, tmp_path / "ckpt" / "deltatune" / "d", "d")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    dt.load(back, tmp_path / "ckpt" / "deltatune" / "d")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)
        assert not torch.allclose(want, bare, atol=1e-3)
    copied.save_pretrained(tmp_path / "copy")
    assert _file_keys(tmp_path / "copy") == _file_keys(tmp_path / "ckpt")
    # the last detach gives the model its own set back: a plain save, no warning
    dt.detach(m, "d")
    assert type(m._keys_to_ignore_on_save) is set and m._keys_to_ignore_on_save == own
    caplog.clear()
    with caplog.at_level("WARNING", logger="deltatune"):
        m.save_pretrained(tmp_path / "plain")
    assert not [r for r in caplog.records if r.name == "deltatune"]


def _trainer(model, out, steps, callbacks):
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(3, VOCAB, (8, 16), generator=gen)
    data = [{"input_ids": s, "labels": s, "attention_mask": torch.ones_like(s)} for s in seqs] * 4
    args = TrainingArguments(output_dir=str(out), max_steps=steps, learning_rate=1e-2, per_device_train_batch_size=4,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=3, logging_steps=1,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def _delta_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "deltatune" in k}


def test_trainer_callback_checkpoints_deltas_and_resume_equals_an_uninterrupted_run(tmp_path, caplog):
    """An unmodified Trainer with dt.DeltaCallback: every checkpoint-N/ holds the base (model.safetensors, no delta
    keys) and the delta (deltatune/<name>/); resuming from checkpoint-3 on a fresh model with a differently
    initialised delta ends with the same delta as the uninterrupted 6-step run (dropout on: the Trainer restores
    its RNG, the callback the delta)."""
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=4, alpha=8, dropout=0.1), "d")
    with caplog.at_level("WARNING", logger="deltatune"):
        _trainer(m, tmp_path / "run", 6, [dt.DeltaCallback()]).train()
    assert not [r for r in caplog.records if r.name == "deltatune"]  # the callback saves the deltas: no warning
    final = _delta_tensors(m)
    ids = torch.randint(3, VOCAB, (2, 9))
    m.eval()
    with torch.no_grad():
        want = m(ids).logits
    for step in (3, 6):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        assert (ckpt / "deltatune" / "d" / "delta.safetensors").is_file()
        assert _file_keys(ckpt) and not any("deltatune" in k for k in _file_keys(ckpt))
    at3 = dt.Delta.read(tmp_path / "run" / "checkpoint-3" / "deltatune" / "d")
    assert not torch.equal(at3.state["model.layers.0.self_attn.q_proj"]["lora_B"],
                           final["model.layers.0.self_attn.q_proj.deltatune.d.lora_B"])
    # from_pretrained(checkpoint) + dt.load restores the adapted model exactly
    back = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint-6").eval()
    dt.load(back, tmp_path / "run" / "checkpoint-6" / "deltatune" / "d")
    with torch.no_grad():
        assert torch.equal(back(ids).logits, want)

    # resume from checkpoint-3 (checkpoint-6 gone, as after a crash) on a fresh model
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoint-6")
    fresh = tiny_llama()
    torch.manual_seed(99)
    dt.attach(fresh, dt.LoRA(r=4, alpha=8, dropout=0.1), "d")
    randomize(fresh, "d", seed=5)  # another starting point: only a restore can make it end where the run ended
    _trainer(fresh, tmp_path / "run", 6, [dt.DeltaCallback()]).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))
    got = _delta_tensors(fresh)
    assert got.keys() == final.keys()
    for k in final:
        assert torch.allclose(got[k], final[k], atol=1e-6), k
    # without the saved delta, resuming is refused with the reason
    shutil.rmtree(tmp_path / "run" / "checkpoint-3" / "deltatune")
    again = tiny_llama()
    dt.attach(again, dt.LoRA(r=4, alpha=8, dropout=0.1), "d")
    with pytest.raises(dt.errors.DeltaNotFoundError, match="checkpoint-3"):
        _trainer(again, tmp_path / "run", 6, [dt.DeltaCallback()]).train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-3"))


def test_load_best_model_at_end_takes_the_best_checkpoints_deltas(tmp_path):
    """load_best_model_at_end with eval_loss and greater_is_better=True: the best checkpoint is the first (the loss
    falls), not the last; the Trainer reloads its base, DeltaCallback its deltas, so the final model is that
    checkpoint's model."""
    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=4, alpha=8), "d")
    gen = torch.Generator().manual_seed(1)
    seqs = torch.randint(3, VOCAB, (8, 16), generator=gen)
    data = [{"input_ids": s, "labels": s, "attention_mask": torch.ones_like(s)} for s in seqs]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, learning_rate=1e-2,
                             per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="steps",
                             save_steps=2, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                             metric_for_best_model="eval_loss", greater_is_better=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)
    trainer = Trainer(model=m, args=args, train_dataset=data * 4, eval_dataset=data, callbacks=[dt.DeltaCallback()])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2"), best
    last = dt.Delta.read(tmp_path / "run" / "checkpoint-6" / "deltatune" / "d")
    want = dt.Delta.read(tmp_path / "run" / "checkpoint-2" / "deltatune" / "d")
    got = pieces(m, "d")
    assert want.state.keys() == got.keys()
    for p, piece in got.items():
        for k, t in want.state[p].items():
            assert torch.equal(piece.state_dict()[k], t), (p, k)
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(last.state[q]["lora_B"], want.state[q]["lora_B"])  # the last step's delta differs


def test_a_failed_training_leaves_the_save_pretrained_warning_on(tmp_path, caplog):
    """The warning is silenced only inside the Trainer's checkpoint saves: after a run that raises, a plain
    save_pretrained warns again."""
    from transformers import TrainerCallback

    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise RuntimeError("boom")

    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=4), "d")
    with caplog.at_level("WARNING", logger="deltatune"), pytest.raises(RuntimeError, match="boom"):
        _trainer(m, tmp_path / "run", 6, [dt.DeltaCallback(), Boom()]).train()
    assert (tmp_path / "run" / "checkpoint-3" / "deltatune" / "d").is_dir()
    assert not [r for r in caplog.records if r.name == "deltatune"]  # the checkpoint save at step 3: silent
    with caplog.at_level("WARNING", logger="deltatune"):
        m.save_pretrained(tmp_path / "after")
    assert len([r for r in caplog.records if r.name == "deltatune"]) == 1


def test_callback_refuses_names_not_attached_and_hyperparameter_search(tmp_path):
    from types import SimpleNamespace

    m = tiny_llama()
    dt.attach(m, dt.LoRA(r=4), "d")
    args, state = SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=0)
    with pytest.raises(dt.errors.DeltaNameError, match=r"\['nope'\].*attached: \['d'\]"):
        dt.DeltaCallback(names=["d", "nope"]).on_train_begin(args, state, None, model=m)
    trial = SimpleNamespace(global_step=0, is_hyper_param_search=True)
    with pytest.raises(dt.errors.UnsupportedError, match="hyperparameter_search"):
        dt.DeltaCallback().on_train_begin(args, trial, None, model=m)
    dt.DeltaCallback(save=False).on_train_begin(args, trial, None, model=m)  # nothing written: allowed
