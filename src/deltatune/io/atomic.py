"""Atomic writes.

Single files (`write_bytes`, `write_text`): write a temporary file in the target directory, fsync, rename over the
target. `write_files` does the same for several files: all are written to temporary files first, then renamed one
by one; if a rename fails the files already replaced are restored.

Directories (`replace_dir`, `new_staging` + `publish_dir`): a delta or checkpoint directory is replaced as a whole,
so that at every instant — including after a kill at any point — its path names either the complete previous
directory or the complete new one (or nothing, for a first save):

1. `check_output` refuses unsafe targets before anything is written (the root, the home directory, a file, a symlink
   loop, a mount point, the current directory, a directory holding files the caller does not own).
2. Under an advisory lock on the parent directory, leftovers of interrupted replacements of the same target
   (`.NAME.*.dtnew`, `.NAME.*.dtold`, and the older `.NAME.*.tmp` / `.old` directories) are removed; if the target is
   missing because a two-rename replacement (step 4, fallback) was interrupted between its renames, the previous
   directory is first renamed back.
3. A fresh sibling staging directory `.NAME.<random>.dtnew` is filled; every file is fsynced, then the directory.
4. Commit, under the lock: a first save renames the staging directory to the target. Otherwise the two are swapped
   in one step with `renameat2(RENAME_EXCHANGE)` (Linux); where the filesystem or platform lacks it, the target is
   renamed to `.NAME.<same random>.dtold` and the staging directory to the target — a kill between the two leaves
   both siblings, which `recover` (run by the next save and by every read through the format registry) resolves
   by renaming the previous directory back. The parent directory is fsynced.
5. The previous directory (now the staging name, or `.dtold`) is removed; a kill here leaves only a leftover that
   step 2 of the next save removes.

An exception raised in-process at any step (a full disk, a failed rename or fsync) undoes what was done: the target
is the previous directory again and the staging directory is removed.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ..core.errors import OutputPathError


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-global)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_copy(path: Path, data: bytes) -> str:
    """Write `data` to a fsynced temporary file next to `path` with the permissions `path` would get; return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:  # mkstemp makes a private 0600 file; give it the mode of the file it replaces, or the umask default
            mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask()
            os.fchmod(fd, mode)
        except OSError:
            pass
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def write_bytes(path: str | Path, data: bytes) -> None:
    write_files({Path(path): data})


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_files(files: dict[Path, bytes]) -> None:
    """Replace every file in `files` (in order) or, on failure, none of them."""
    temps: dict[Path, str] = {}
    backups: dict[Path, str | None] = {}
    done: list[Path] = []
    try:
        for path, data in files.items():
            temps[Path(path)] = _temp_copy(Path(path), data)
        if len(temps) > 1:  # keep the old versions until every rename has succeeded
            for path in temps:
                if path.exists():
                    fd, bak = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".bak", dir=path.parent)
                    os.close(fd)
                    os.unlink(bak)
                    try:
                        os.link(path, bak)
                    except OSError:  # no hard links on this filesystem
                        shutil.copy2(path, bak)
                    backups[path] = bak
                else:
                    backups[path] = None
        for path, tmp in temps.items():
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for path in reversed(done):
            try:
                if backups.get(path) is not None:
                    os.replace(backups.pop(path), path)
                else:
                    os.unlink(path)
            except OSError:
                pass
        raise
    finally:
        for leftover in list(temps.values()) + [b for b in backups.values() if b is not None]:
            if os.path.exists(leftover):
                os.unlink(leftover)


# --- directories replaced as a whole --------------------------------------------------------------------------------
NEW_SUFFIX = ".dtnew"  # a staging directory (being filled, or holding the previous version after a swap)
OLD_SUFFIX = ".dtold"  # the previous directory between the two renames of the fallback replacement
_NAME_PART = 200       # staging names keep at most this much of the target's name (file names are limited to 255)


def _stem(target: Path) -> str:
    return "." + target.name[:_NAME_PART] + "."


def _leftover(target: Path, name: str) -> str | None:
    """'new' / 'old' for our staging / previous-version siblings of `target`, 'legacy' for those of older versions
    (CheckpointWriter's `.NAME.xxxxxxxx.tmp` / `.old`), else None."""
    stem = _stem(target)
    if not name.startswith(stem):
        return None
    rest = name[len(stem):]
    for suffix, kind in ((NEW_SUFFIX, "new"), (OLD_SUFFIX, "old")):
        if rest.endswith(suffix) and re.fullmatch(r"[A-Za-z0-9_]+", rest[: -len(suffix)]):
            return kind
    if re.fullmatch(r"[a-z0-9_]{8}\.(tmp|old)", rest):
        return "legacy"
    return None


def _home() -> Path | None:
    try:
        return Path(os.path.realpath(Path.home()))
    except (RuntimeError, KeyError, OSError):
        return None


def _cwd() -> Path | None:
    try:
        return Path(os.path.realpath(os.getcwd()))
    except OSError:
        return None


def check_output(path: str | Path, owned: Callable[[str], bool], inputs: Iterable[str | Path] = (),
                 holds: str = "a delta") -> Path:
    """Refuse an output directory that writing must not replace; return its real path (symlinks resolved).

    Refused, with an `OutputPathError` naming the path and the reason: a symlink loop, a dangling symlink, a path
    under a regular file, the filesystem root, the home directory, one of `inputs` (or a directory holding one),
    an existing regular file (or other non-directory), the current directory, a mount point, and a directory holding
    anything but regular files whose names `owned` accepts (writing replaces the whole directory, so those would be
    lost). Nothing is created or changed."""
    given = Path(path)

    def refuse(why: str) -> OutputPathError:
        return OutputPathError(f"the output {str(given)!r} {why}")

    try:
        st = os.stat(given)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise refuse("is a symlink loop (or a chain of too many symlinks); name a real directory") from None
        if e.errno == errno.ENOTDIR:
            raise refuse("lies under a regular file, not a directory; name a directory") from None
        if e.errno != errno.ENOENT:
            raise refuse(f"cannot be examined ({e.strerror}); name a directory you can write") from None
        if os.path.islink(given):
            raise refuse(f"is a symbolic link to the missing path {os.readlink(given)!r}; create that directory or "
                         f"name another one") from None
        st = None
    real = Path(os.path.realpath(given))
    if real == Path(real.anchor or "/"):
        raise refuse("is the filesystem root; name a new or empty directory for the output")
    if real == _home():
        raise refuse("is the home directory; name a new or empty directory for the output")
    for p in inputs:
        q = Path(os.path.realpath(p))
        if q == real or real in q.parents:
            raise refuse(f"is (or holds) the input {str(p)!r}; write the result somewhere else")
    if st is None:
        return real
    if not stat.S_ISDIR(st.st_mode):
        kind = "a regular file" if stat.S_ISREG(st.st_mode) else "not a directory"
        raise refuse(f"exists and is {kind}; the output is a directory — name a new or empty directory")
    if real == _cwd():
        raise refuse("is the current directory, which writing would replace as a whole; name a directory inside it")
    if os.path.ismount(real):
        raise refuse("is a mount point, which cannot be replaced as a whole; name a directory inside it")
    try:
        entries = list(os.scandir(real))
    except OSError as e:
        raise refuse(f"cannot be listed ({e.strerror})") from None
    foreign = sorted(e.name for e in entries if not (e.is_file(follow_symlinks=False) and owned(e.name)))
    if foreign:
        raise refuse(f"holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} that are not part of "
                     f"{holds} ({', '.join(map(repr, foreign[:4]))}"
                     f"{', ...' if len(foreign) > 4 else ''}); writing replaces the whole directory, so they would be "
                     f"lost — choose a new or empty directory")
    return real


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An advisory exclusive lock on `directory` (flock), so that cleaning, recovering and committing of saves beside
    each other do not interleave. Best effort: without fcntl or where the filesystem refuses, no lock."""
    try:
        import fcntl

        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries durable; filesystems that cannot fsync a directory are let be."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR):
            raise
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Best effort: remove a leftover directory (or file); errors are ignored, the next save tries again."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except OSError:
        pass


_RENAME_EXCHANGE = 2
_renameat2: object = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux renameat2 RENAME_EXCHANGE). False where the platform, the C
    library or the filesystem cannot; raises OSError for other failures."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        try:
            import ctypes

            func = ctypes.CDLL(None, use_errno=True).renameat2
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            func.restype = ctypes.c_int
            _renameat2 = func
        except (ImportError, OSError, AttributeError, TypeError):
            pass
    if _renameat2 is False:
        return False
    import ctypes

    at_fdcwd = -100
    sys.audit("deltatune.io.exchange", a, b)  # ctypes calls raise no audit event of their own
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:  # type: ignore[operator]
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"cannot swap {str(a)!r} and {str(b)!r}: {os.strerror(err)}")


def _clean(target: Path, remove: bool = True) -> None:
    """Under the parent's lock: undo an interrupted two-rename replacement of `target`, then (with `remove`) remove
    every leftover of interrupted replacements beside it."""
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    kinds = {n: _leftover(target, n) for n in names}
    if not os.path.lexists(target):
        news = {n[len(_stem(target)):-len(NEW_SUFFIX)] for n, k in kinds.items() if k == "new"}
        for n, k in kinds.items():
            # the previous directory is only put back in the window between the two renames, where its complete
            # replacement (same random part) still waits beside it; an older `.dtold` is garbage
            if k == "old" and n[len(_stem(target)):-len(OLD_SUFFIX)] in news:
                os.rename(target.parent / n, target)
                break
    if not remove:
        return
    for n, k in kinds.items():
        if k is not None and os.path.lexists(target.parent / n):
            _remove(target.parent / n)


def recover(path: str | Path) -> None:
    """Put a delta directory back that an interrupted replacement left missing (only possible where directories
    cannot be swapped in one step). Readers call this before looking for `path`; it does nothing otherwise."""
    target = Path(os.path.realpath(path))
    if os.path.lexists(target):
        return
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    if any(_leftover(target, n) == "old" for n in names):
        with _locked(target.parent):
            if not os.path.lexists(target):
                _clean(target, remove=False)  # leftovers stay for the next save: a reader removes nothing


def _dir_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o7777
    except OSError:
        return 0o777 & ~_umask()


def new_staging(target: Path) -> Path:
    """A fresh staging directory beside the real directory `target` (see `check_output`), after removing the
    leftovers of interrupted replacements of `target`. Its mode is the target's (or the umask default)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent):
        _clean(target)
        stage = Path(tempfile.mkdtemp(prefix=_stem(target), suffix=NEW_SUFFIX, dir=target.parent))
    try:
        os.chmod(stage, _dir_mode(target))
    except BaseException:
        _remove(stage)
        raise
    return stage


def publish_dir(stage: Path, target: Path) -> Path:
    """Put the finished directory `stage` (from `new_staging`) at `target` in one step and remove the previous one.
    On an exception the previous directory is back in place and `stage` is removed."""
    previous: Path | None = None
    undo: list[tuple[Path, Path]] = []  # the renames that put things back, in order
    keep = False  # set where undoing failed half-way: both directories stay beside the target for `recover`
    try:
        _fsync_dir(stage)
        with _locked(target.parent):
            try:
                if not os.path.lexists(target):
                    os.rename(stage, target)  # a first save: nothing, then everything
                    undo = [(target, stage)]
                elif _exchange(stage, target):
                    previous = stage  # the swap left the previous directory at the staging name
                else:  # two renames; a kill between them is undone by `recover` / the next save (module doc)
                    previous = target.parent / (stage.name[: -len(NEW_SUFFIX)] + OLD_SUFFIX)
                    os.rename(target, previous)
                    undo = [(previous, target)]
                    os.rename(stage, target)
                    undo = [(target, stage), (previous, target)]
                _fsync_dir(target.parent)
            except BaseException:
                if previous == stage:
                    try:
                        _exchange(stage, target)  # swap back
                    except BaseException:
                        pass  # the new directory stays; the previous one, at the staging name, is removed below
                for src, dst in undo:
                    try:
                        os.rename(src, dst)
                    except BaseException:
                        keep = True
                        break
                raise
    except BaseException:
        if not keep:
            _remove(stage)
        raise
    if previous is not None:
        _remove(previous)
    return target


def _write_new(path: Path, data: bytes, mode: int | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0),
                 0o666)  # the umask applies, as for any new file
    try:
        if mode is not None and hasattr(os, "fchmod"):
            os.fchmod(fd, mode)  # keep the mode of the file it replaces
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(path: str | Path, files: Mapping[str, bytes], owned: Callable[[str], bool]) -> Path:
    """Make directory `path` hold exactly `files` ({file name: contents}), replacing whatever delta it held as a
    whole (see the module doc). `owned` names the files a previous version may hold (`check_output`)."""
    target = check_output(path, owned)
    for name in files:
        if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
            raise ValueError(f"not a plain file name: {name!r}")
    stage = new_staging(target)
    try:
        for name, data in files.items():
            try:
                old_mode: int | None = (target / name).stat().st_mode & 0o7777
            except OSError:
                old_mode = None
            _write_new(stage / name, data, old_mode)
    except BaseException:
        _remove(stage)
        raise
    publish_dir(stage, target)
    return Path(path)


def dir_bytes(path: str | Path, owned: Callable[[str], bool]) -> int:
    """The size of the regular files directly in `path` whose names `owned` accepts: what a writer put there
    (never a walk of the tree, never a followed symlink)."""
    total = 0
    try:
        with os.scandir(path) as entries:
            for e in entries:
                if e.is_file(follow_symlinks=False) and owned(e.name):
                    total += e.stat(follow_symlinks=False).st_size
    except OSError:
        pass
    return total
