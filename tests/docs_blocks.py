"""The code blocks of README.md and docs/*.md, and how they run (used by tests/test_docs.py).

Info string of a fenced block: ``LANG [MARKER ...] [# comment]``, e.g. ```` ```python skip # needs your model ````.

* Languages that run: ``python``; ``bash``, ``sh``, ``shell`` (a bash script with ``set -eo pipefail``);
  ``console`` (the lines starting with ``$ `` are the commands, a trailing backslash continues one; the rest is
  output and is not checked). Every other block must still name its language (``text``, ``yaml``, ...), so no code
  hides in an unlabelled block.
* Markers: ``skip`` — an intentional fragment, never run (reported as skipped, the comment as the reason);
  ``slow`` — runs only under ``-m slow`` (real models, real training); ``continues`` — builds on the blocks before
  it (see below). Anything else after the language that is not after ``#`` is an error, so a typo cannot turn a
  marker into a silently ignored word.
* State: every block runs alone, in a fresh process and a fresh temporary directory that holds a symlink to each
  top-level entry of the repository (``examples/``, ``src/``, ...) and ``.venv`` (the running environment): repository paths resolve, outputs (``runs/``,
  ``out/``) land in the temporary directory. A block marked ``continues`` runs after the blocks before it in the
  same file, back to and including the nearest one not marked ``continues`` (skipped blocks excepted): they run
  again, in order, in the same directory, python blocks in one interpreter, so names and files carry over. (A
  shell block continuing a block that already passed in this session runs in that block's directory instead: files
  are all a shell block can use, so the chain is not run twice.)
* Environment: the running interpreter's ``bin/`` first on ``PATH`` (``deltatune``, ``python``), ``src/`` on
  ``PYTHONPATH``, one thread (``OMP_NUM_THREADS=1``), offline Hugging Face, ``MPLBACKEND=Agg``.
* Python blocks are compiled under the markdown file's path with their real line numbers, so a traceback names
  ``docs/x.md``, line N. By default they run in a child forked from a warm process that has already imported
  torch, transformers and deltatune (their globals are fresh; a missing import still fails); set
  ``DELTATUNE_DOCS_FRESH=1`` to start a new interpreter per block instead.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = {"python": "python", "bash": "shell", "sh": "shell", "shell": "shell", "console": "console"}
MARKERS = {"skip", "slow", "continues"}
NOT_LINKED = {"runs", "out", "build", "dist"}  # outputs a block may write: fresh in every temporary directory
FENCE = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")


@dataclass
class Block:
    file: str  # relative to ROOT
    line: int  # 1-based line of the opening fence
    lang: str
    markers: frozenset[str]
    comment: str
    code: str
    chain: list[Block] = field(default_factory=list, repr=False)  # blocks it continues (continues only)

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def kind(self) -> str | None:
        return RUNNABLE.get(self.lang)

    @property
    def slow(self) -> bool:
        return any("slow" in b.markers for b in [*self.chain, self])

    def listing(self) -> str:
        """The block with its markdown line numbers."""
        return "\n".join(f"{self.line + 1 + i:5d} | {text}" for i, text in enumerate(self.code.splitlines()))


def doc_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def parse(path: Path, root: Path = ROOT) -> tuple[list[Block], list[str]]:
    """Every fenced block of one markdown file, and the problems found (unlabelled, unknown marker, unclosed)."""
    rel = path.relative_to(root).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    errors: list[str] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or (m.group(2)[0] == "`" and "`" in m.group(3)):
            i += 1
            continue
        indent, fence, info = len(m.group(1)), m.group(2), m.group(3).strip()
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            j += 1
        where = f"{rel}:{i + 1}"
        if j == len(lines):
            errors.append(f"{where}: the code block is never closed")
        words, _, comment = info.partition("#")
        lang, *rest = words.split() or [""]
        if not lang:
            errors.append(f"{where}: a code block without a language; name it (python, bash, text, yaml, ...)")
        unknown = [w for w in rest if w not in MARKERS]
        if unknown:
            errors.append(f"{where}: unknown marker(s) {unknown} in {info!r} (markers: {sorted(MARKERS)}; "
                          f"a comment goes after '#')")
        if rest and lang not in RUNNABLE:
            errors.append(f"{where}: markers on a {lang!r} block, which never runs")
        code = "\n".join(ln[indent:] if ln[:indent].isspace() else ln for ln in lines[i + 1:j])
        blocks.append(Block(rel, i + 1, lang, frozenset(rest), comment.strip(), code))
        i = j + 1
    runnable = [b for b in blocks if b.kind]
    for n, b in enumerate(runnable):
        if "continues" in b.markers:
            chain = []
            for prev in reversed(runnable[:n]):
                if "skip" not in prev.markers:
                    chain.insert(0, prev)
                if "continues" not in prev.markers and "skip" not in prev.markers:
                    break
            if not chain:
                errors.append(f"{b.id}: marked continues, but no block before it runs")
            b.chain = chain
    return blocks, errors


def collect(root: Path = ROOT) -> tuple[list[Block], list[str]]:
    blocks: list[Block] = []
    errors: list[str] = []
    for path in doc_files(root):
        b, e = parse(path, root)
        blocks += b
        errors += e
    return blocks, errors


# --- running ---------------------------------------------------------------------------------------------------
def workdir(tmp: Path, root: Path = ROOT) -> Path:
    """`tmp` with a symlink to every top-level entry of the repository but hidden ones and output folders."""
    for entry in root.iterdir():
        if entry.name.startswith(".") or entry.name in NOT_LINKED or entry.name.endswith(".egg-info"):
            continue
        (tmp / entry.name).symlink_to(entry)
    (tmp / ".venv").symlink_to(sys.prefix)  # `.venv/bin/deltatune` in a block: the environment running the tests
    return tmp


def block_env(root: Path = ROOT) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(root / "src"), env.get("PYTHONPATH", "")] if p)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_CURRENT_TEST", None)
    return env


def shell_script(block: Block, root: Path = ROOT) -> str:
    """The bash script of a shell or console block; a failing command reports its markdown line."""
    if block.kind == "console":
        cmds, cont = [], False
        for n, text in enumerate(block.code.splitlines()):
            if text.startswith("$ ") or cont:
                cmds.append((n, text[2:] if not cont else text))
                cont = text.rstrip().endswith("\\")
        lines = {n: t for n, t in cmds}
        body = [lines.get(n, "") for n in range(len(block.code.splitlines()))]
    else:
        body = block.code.splitlines()
    header = ["set -eo pipefail",
              f"trap 'echo \"{block.file}:$((LINENO + {block.line} - 2)): exit $?: $BASH_COMMAND\" >&2' ERR"]
    assert len(header) == 2  # line 3 of the script is the block's first line, markdown line block.line + 1
    return "\n".join(header + body) + "\n"


@dataclass
class Outcome:
    rc: int
    timed_out: bool
    stdout: str
    stderr: str
    seconds: float


def _run_process(argv: list[str], cwd: Path, env: dict[str, str], timeout: float, out: Path) -> Outcome:
    start = time.perf_counter()
    with open(out / "stdout.txt", "wb") as so, open(out / "stderr.txt", "wb") as se:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=so, stderr=se,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    return Outcome(rc, timed_out, (out / "stdout.txt").read_text(errors="replace"),
                   (out / "stderr.txt").read_text(errors="replace"), time.perf_counter() - start)


def python_spec(blocks: list[Block], root: Path = ROOT) -> list[dict]:
    return [{"path": str(root / b.file), "line": b.line, "code": b.code} for b in blocks]


def exec_python(spec: list[dict]) -> int:
    """Run python blocks in order in one namespace (in the current process); the exit status."""
    import traceback

    namespace: dict = {"__name__": "__main__", "__builtins__": __builtins__}
    for item in spec:
        try:
            code = compile("\n" * item["line"] + item["code"] + "\n", item["path"], "exec")
            exec(code, namespace)
        except SystemExit as e:
            if e.code not in (None, 0):
                print(f"SystemExit({e.code!r}) in the block at {item['path']}:{item['line']}", file=sys.stderr)
                return e.code if isinstance(e.code, int) else 1
        except BaseException as e:  # the traceback from the block's own frame on (not this runner's)
            traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
            return 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return 0


class ForkServer:
    """A process that has imported the heavy modules once and forks a child per request (POSIX only)."""

    #: imported once by the server (a cache: blocks import what they use into their own fresh globals); transformers
    #: imports each model family lazily, and on a loaded machine that costs seconds per block
    PRELOAD = ("torch", "deltatune", "deltatune.train", "deltatune.train.callback", "deltatune.merging",
               "deltatune.merging.compress", "deltatune.merging.extract", "deltatune.zoo", "deltatune.serve",
               "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert",
               "transformers.models.gpt2.modeling_gpt2", "transformers.trainer", "transformers.generation.utils",
               "safetensors.torch")

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the docs fork server did not start: {ready!r}")

    def run(self, spec: list[dict], cwd: Path, env: dict[str, str], timeout: float, out: Path) -> Outcome:
        start = time.perf_counter()
        request = {"spec": spec, "cwd": str(cwd), "env": env, "timeout": timeout, "out": str(out)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the docs fork server exited (status {self.proc.poll()}); "
                               f"DELTATUNE_DOCS_FRESH=1 runs each block in a new interpreter instead")
        reply = json.loads(line)
        return Outcome(reply["rc"], reply["timed_out"], (out / "stdout.txt").read_text(errors="replace"),
                       (out / "stderr.txt").read_text(errors="replace"), time.perf_counter() - start)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _serve() -> None:
    import importlib

    for module in ForkServer.PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        out = Path(req["out"])
        pid = os.fork()
        if pid == 0:  # the child: its own session (a timeout kills what it started too), files for its output
            os.setsid()
            try:
                fd_in = os.open(os.devnull, os.O_RDONLY)
                fd_out = os.open(out / "stdout.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                fd_err = os.open(out / "stderr.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                for fd, target in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
                    os.dup2(fd, target)
                sys.stdin = open(0, closefd=False)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                os.chdir(req["cwd"])
                os.environ.clear()
                os.environ.update(req["env"])
                sys.argv = ["-c"]
                sys.path.insert(0, "")
                rc = exec_python(req["spec"])
            except BaseException:
                import traceback

                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
        deadline = time.monotonic() + req["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                os.killpg(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.02)
        rc = os.waitstatus_to_exitcode(status)
        print(json.dumps({"rc": rc, "timed_out": timed_out}), flush=True)


def run_block(block: Block, tmp: Path, timeout: float, server: ForkServer | None = None,
              root: Path = ROOT, reuse: Path | None = None) -> Outcome:
    """Run a block (after the blocks it continues) in a fresh directory made from `tmp`; files of the output
    go to `tmp/.out-N`. `reuse`: for a shell block, the directory where the blocks it continues already ran (their
    files are all it needs), so they are not run again."""
    cwd = workdir(tmp, root) if reuse is None else reuse
    env = block_env(root)
    deadline = time.monotonic() + timeout
    outcome = Outcome(0, False, "", "", 0.0)
    groups: list[list[Block]] = []
    for b in [*(block.chain if reuse is None else []), block]:  # consecutive python blocks share one interpreter
        if groups and b.kind == "python" and groups[-1][-1].kind == "python":
            groups[-1].append(b)
        else:
            groups.append([b])
    for n, group in enumerate(groups):
        out = tmp / f".out-{n}"
        out.mkdir()
        left = max(deadline - time.monotonic(), 1.0)
        if group[0].kind == "python":
            spec = python_spec(group, root)
            if server is not None:
                outcome = server.run(spec, cwd, env, left, out)
            else:
                argv = [sys.executable, str(Path(__file__).resolve()), "--exec", json.dumps(spec)]
                outcome = _run_process(argv, cwd, env, left, out)
        else:
            script = out / "block.sh"
            script.write_text(shell_script(group[0], root))
            outcome = _run_process(["bash", str(script)], cwd, env, left, out)
        if outcome.rc != 0:
            if group[-1] is not block:
                outcome.stderr += f"\n(failed in the blocks it continues: {', '.join(b.id for b in group)})"
            return outcome
    return outcome


def failure_report(block: Block, outcome: Outcome, tail: int = 60) -> str:
    what = "timed out" if outcome.timed_out else f"exited with status {outcome.rc}"
    err = "\n".join(outcome.stderr.splitlines()[-tail:])
    out = "\n".join(outcome.stdout.splitlines()[-20:])
    chain = f" (continuing {', '.join(b.id for b in block.chain)})" if block.chain else ""
    return (f"{block.id} ({block.lang}) {what} after {outcome.seconds:.1f} s{chain}\n--- the block ---\n"
            f"{block.listing()}\n--- stderr (last {tail} lines) ---\n{err}\n--- stdout (last 20 lines) ---\n{out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        _serve()
    elif sys.argv[1:2] == ["--exec"]:
        sys.path.insert(0, "")
        sys.exit(exec_python(json.loads(sys.argv[2])))
    else:  # list the blocks: python tests/docs_blocks.py
        found, problems = collect()
        for b in found:
            print(f"{b.id:28s} {b.lang:8s} {' '.join(sorted(b.markers)):16s} {b.comment}")
        print("\n".join(problems) or "no problems", file=sys.stderr)
