"""Typed options (issue 17 item 3): training options, delta configs and recipes mean their declared types however they
are written ("1e-4", 1e-4, 0.0001), and a value that is not one is a one-line `error:` naming the option, the value and
the expected type, exit status 2, with the closest known name for an unknown option."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.core.config import DeltaConfig
from deltatune.core.errors import ConfigError
from deltatune.train import TrainConfig


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def one_error(result, expected: str) -> None:
    """Exit status 2 and exactly one line of output, `error: <expected>` (no traceback, no usage box)."""
    assert result.exit_code == 2, result.output
    assert result.output == f"error: {expected}\n", result.output


def test_numbers_and_booleans_written_any_way_are_the_same_option(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("lr: 1e-4\nepochs: 1\nbatch_size: 16.0\nplot: no\nmax_steps: '3'\n"
                                     "delta: {kind: lora, r: '4', alpha: 1e1, dora: 'false'}\n")
    (tmp_path / "b.yaml").write_text("lr: '0.0001'\nepochs: '1'\nbatch_size: '16'\nplot: 'false'\nmax_steps: 3\n"
                                     "delta: {kind: lora, r: 4, alpha: 10.0}\n")
    a, b = TrainConfig.from_yaml(tmp_path / "a.yaml"), TrainConfig.from_yaml(tmp_path / "b.yaml")
    c = TrainConfig.from_dict({"lr": 0.0001, "epochs": 1.0, "batch_size": 16, "plot": False, "max_steps": 3,
                               "delta": {"kind": "lora", "r": 4, "alpha": 10}})
    for cfg in (a, b, c):
        assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.plot, cfg.max_steps) == (1e-4, 1.0, 16, False, 3)
        assert type(cfg.lr) is float and type(cfg.batch_size) is int and type(cfg.max_steps) is int
        assert cfg.delta_config() == dt.LoRA(r=4, alpha=10.0)
    for epochs in ("1", 1, 1.0, "1.0"):
        assert TrainConfig.from_dict({"epochs": epochs}).epochs == 1
    for text, value in (("true", True), ("yes", True), ("on", True), ("false", False), ("no", False), ("off", False)):
        assert TrainConfig.from_dict({"resume": text}).resume is value


@pytest.mark.parametrize("options, message", [
    ({"lr": "abc"}, "TrainConfig.lr must be a positive number, got 'abc'"),
    ({"batch_size": 2.5}, "TrainConfig.batch_size must be a positive integer, got 2.5"),
    ({"batch_size": True}, "TrainConfig.batch_size must be a positive integer, got True"),
    ({"plot": "maybe"}, "TrainConfig.plot must be true or false, got 'maybe'"),
    ({"schedule": "cosin"}, "TrainConfig.schedule must be one of ('linear', 'cosine', 'constant'), got 'cosin'; did "
                            "you mean 'cosine'?"),
    ({"max_steps": 0}, "TrainConfig.max_steps must be a positive number of steps or None, got 0"),
    ({"delta": "lora"}, "TrainConfig.delta must be a mapping of names to values, got 'lora'"),
    ({"delta": {"kind": "lora", "r": "x"}}, "LoRA.r must be a positive integer, got 'x'"),
])
def test_bad_values_name_the_option_the_value_and_the_type(options, message) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(options)
    assert str(info.value) == message


def test_unknown_names_suggest_the_closest() -> None:
    with pytest.raises(ConfigError, match=r"^unknown training option 'lrr' \(did you mean 'lr'\?\); known: \["):
        TrainConfig.from_dict({"lrr": 1e-4})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['alpah'\] in LoRA config \(did you mean 'alpha'\?\)"):
        DeltaConfig.from_dict({"kind": "lora", "alpah": 8})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rr'\] for LoRA \(did you mean 'r'\?\)"):
        dt.LoRA(rr=8)
    with pytest.raises(ConfigError, match=r"unknown delta kind 'LoRA' \(did you mean 'lora'\?\)"):
        DeltaConfig.from_dict({"kind": "LoRA"})
    with pytest.raises(ConfigError, match=r"unknown delta kind 'zzz'; known kinds"):  # nothing close: no guess
        DeltaConfig.from_dict({"kind": "zzz"})


def test_cli_errors_are_one_line_for_flags_yaml_and_delta_json(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default run directory, runs/default, would be made here
    one_error(cli("train", "--set", "lr=abc"), "TrainConfig.lr must be a positive number, got 'abc'")
    one_error(cli("train", "--set", "epochs=[1]"), "TrainConfig.epochs must be a number >= 0, got [1]")
    unknown = cli("train", "--set", "lrr=1e-4")
    assert unknown.exit_code == 2 and unknown.output.count("\n") == 1
    assert unknown.output.startswith("error: unknown training option 'lrr' (did you mean 'lr'?); known: ['answer_column'")
    (tmp_path / "run.yaml").write_text("lr: 1e-4\nbatch_size: many\n")
    one_error(cli("train", str(tmp_path / "run.yaml")), "TrainConfig.batch_size must be a positive integer, got 'many'")
    one_error(cli("train", "--delta", '{"kind": "lora", "r": "abc"}'), "LoRA.r must be a positive integer, got 'abc'")
    one_error(cli("train", "--delta", '{"kind": "lora", "alpah": 8}'),
              "unknown key(s) ['alpah'] in LoRA config (did you mean 'alpha'?); known keys: ['alpha', 'alpha_pattern', "
              "'bias', 'dora', 'dropout', 'exclude', 'init', 'layers', 'modules_to_save', 'r', 'rank_pattern', 'rslora', "
              "'targets']")
    assert not (tmp_path / "runs").exists()


def test_every_option_of_every_command_has_help() -> None:
    import click
    import typer

    def commands(cmd: click.Command, name: str):
        yield name, cmd
        for sub_name, sub in getattr(cmd, "commands", {}).items():
            yield from commands(sub, f"{name} {sub_name}")

    missing = [f"{name}: {p.name}" for name, cmd in commands(typer.main.get_command(app), "deltatune")
               for p in cmd.params if not getattr(p, "help", None)]
    assert not missing, missing
    names = [name for name, _ in commands(typer.main.get_command(app), "deltatune")]
    assert {"deltatune train", "deltatune eval", "deltatune merge", "deltatune keys add", "deltatune serve"} <= set(names)


def test_procedure_options_are_typed_too() -> None:
    from deltatune.train.lt_sft import LtSft

    cfg = TrainConfig.from_dict({"delta": {"kind": "dense"},
                                 "procedure": {"kind": "lt_sft", "density": "1e-2", "l1": "0", "dense_max_steps": "5"}})
    assert LtSft.from_dict({k: v for k, v in cfg.procedure.items() if k != "kind"}) == LtSft(density=0.01, dense_max_steps=5)
    with pytest.raises(ConfigError, match=r"^LtSft.l1 must be a number >= 0, got 'none'$"):
        TrainConfig.from_dict({"delta": {"kind": "dense"}, "procedure": {"kind": "lt_sft", "density": 0.1, "l1": "none"}})
    with pytest.raises(ConfigError, match=r"unknown lt_sft option\(s\) \['densty'\] \(did you mean 'density'\?\)"):
        TrainConfig.from_dict({"delta": {"kind": "dense"}, "procedure": {"kind": "lt_sft", "densty": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown training procedure 'ltsft' \(did you mean 'lt_sft'\?\)"):
        TrainConfig.from_dict({"delta": {"kind": "dense"}, "procedure": {"kind": "ltsft"}})


def test_unknown_zoo_names_list_the_zoo_and_the_closest(tmp_path: Path, monkeypatch) -> None:
    from deltatune import zoo
    from deltatune.serve.http.server import load_base
    from deltatune.train.loop import load_model

    monkeypatch.chdir(tmp_path)  # no directory of these names here
    with pytest.raises(ConfigError, match=r"model 'minilm-l66' is neither a zoo model \(did you mean 'minilm-l6'\?\) "
                                          r"\(zoo models: minilm-l6, smollm2-135m\) nor a local HF directory"):
        load_model(TrainConfig(model="minilm-l66"), "classification", 2)
    with pytest.raises(ConfigError, match=r"--model 'smollm2' is neither a zoo model \(did you mean 'smollm2-135m'\?\)"):
        load_base("smollm2")
    with pytest.raises(zoo.ZooError, match=r"unknown zoo model 'MiniLM-L6' \(did you mean 'minilm-l6'\?\); available"):
        zoo.load_model("MiniLM-L6")
    with pytest.raises(zoo.ZooError, match=r"unknown zoo dataset 'gsm8' \(did you mean 'gsm8k'\?\); available"):
        zoo.load_dataset("gsm8")
