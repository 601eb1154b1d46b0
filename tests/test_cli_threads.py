"""merge / compress / extract run with few torch threads (cli/threads.py), restored afterwards."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import deltatune.merging.recipe as recipe_module
from deltatune.cli import app
from deltatune.cli.threads import file_command_threads


def test_the_cap_lowers_never_raises_and_restores() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with file_command_threads(2) as n:
            assert n == 2 == torch.get_num_threads()
        assert torch.get_num_threads() == 3
        torch.set_num_threads(1)
        with file_command_threads(4) as n:  # the user's lower count stands
            assert n == 1 == torch.get_num_threads()
        with pytest.raises(RuntimeError):
            with file_command_threads(1):
                raise RuntimeError("boom")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_merge_runs_with_one_thread_unless_told(monkeypatch, tmp_path) -> None:
    seen = []
    monkeypatch.setattr(recipe_module, "load_recipe", lambda path: seen.append(torch.get_num_threads()) or {})
    monkeypatch.setattr(recipe_module, "run_recipe", lambda r, progress: {"method": "x"})
    before = torch.get_num_threads()
    runner = CliRunner()
    try:
        torch.set_num_threads(2)
        assert runner.invoke(app, ["merge", str(tmp_path / "r.yaml"), "--json"]).exit_code == 0
        monkeypatch.setenv("DELTATUNE_FILE_THREADS", "3")
        assert runner.invoke(app, ["merge", str(tmp_path / "r.yaml"), "--json"]).exit_code == 0
        assert seen == [1, 3] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("DELTATUNE_FILE_THREADS", "many")
    res = runner.invoke(app, ["merge", str(tmp_path / "r.yaml")])
    assert res.exit_code == 2 and res.output == "error: DELTATUNE_FILE_THREADS must be a positive integer (torch " \
                                                "threads), got 'many'\n"
