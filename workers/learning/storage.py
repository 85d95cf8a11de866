"""Blob storage for job inputs and derivatives (rendered pages, text layers).

Keys are relative POSIX paths ("derived/<sha256>/page-001.png"). The interface is
small on purpose so an object store (S3, MinIO) can stand in for `LocalStorage`
later without touching the handlers.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol, runtime_checkable

DEFAULT_STORAGE_DIR = "./.jobvisor/storage"
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


@runtime_checkable
class Storage(Protocol):
    def read(self, key: str) -> bytes:
        """Return the object's bytes; FileNotFoundError when it does not exist."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Store atomically: readers see the old object or the new one, never half."""
        ...

    def exists(self, key: str) -> bool: ...

    def path(self, key: str) -> Path | None:
        """Local file for tools that need one; None for backends without local files."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object whose key starts with `prefix`; returns how many."""
        ...


def normalize_key(key: str) -> str:
    """Validate a storage key and return its canonical form.

    Keys come from payloads, so anything that could leave the storage root
    (absolute paths, `..`, drive letters, backslashes) is refused outright rather
    than "cleaned", which would hide a bug or an attack.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("storage key must be a non-empty string")
    if "\x00" in key or "\\" in key:
        raise ValueError("storage key must not contain NUL or backslash")
    pure = PurePosixPath(key)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", key):
        raise ValueError(f"storage key must be relative, got an absolute path: {key!r}")
    if ".." in pure.parts:
        raise ValueError(f"storage key must not contain '..' (path traversal): {key!r}")
    parts = [p for p in pure.parts if p != "."]
    if not parts:
        raise ValueError(f"storage key names no object: {key!r}")
    return "/".join(parts)


class LocalStorage:
    """Files under one root directory; works for any number of processes at once."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()

    def _file(self, key: str) -> Path:
        target = self.root.joinpath(*normalize_key(key).split("/"))
        # Defence in depth: a symlink inside the root could still point outside it.
        if not target.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"storage key resolves outside the storage root: {key!r}")
        return target

    def read(self, key: str) -> bytes:
        return self._file(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Temp file in the same directory so os.replace is a same-filesystem rename,
        # which is atomic: a crashed or concurrent writer never leaves a torn file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._file(key).is_file()

    def path(self, key: str) -> Path | None:
        return self._file(key)

    def delete_prefix(self, prefix: str) -> int:
        # An empty prefix would wipe the whole store; normalize_key refuses it.
        norm = normalize_key(prefix)
        whole_dir = prefix.endswith("/")
        base = self._file(norm)
        if whole_dir or base.is_dir():
            if not base.is_dir():
                return 0
            count = sum(1 for p in base.rglob("*") if p.is_file())
            shutil.rmtree(base)
            return count
        count = 0
        parent = base.parent
        if not parent.is_dir():
            return 0
        for entry in parent.iterdir():
            if not entry.name.startswith(base.name):
                continue
            if entry.is_dir():
                count += sum(1 for p in entry.rglob("*") if p.is_file())
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
                count += 1
        return count


def storage_from_env() -> LocalStorage:
    """`STORAGE_DIR` (default ./.jobvisor/storage, relative to the working directory)."""
    return LocalStorage(Path(os.environ.get("STORAGE_DIR") or DEFAULT_STORAGE_DIR))


def content_hash(data: bytes) -> str:
    """sha256 hex of the bytes: the cache key for everything derived from them."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class DerivedPaths:
    """Storage keys of the derivatives of one input, all under `derived/<hash>/`."""

    hash: str

    def __post_init__(self) -> None:
        # The hash becomes part of a key; only a real sha256 hex may get there.
        if not _HASH_RE.match(self.hash):
            raise ValueError("DerivedPaths needs a sha256 hex digest")

    @property
    def prefix(self) -> str:
        return f"derived/{self.hash}/"

    def page(self, number: int) -> str:
        """Key of page `number` (1-based) as PNG."""
        if number < 1:
            raise ValueError("page numbers start at 1")
        return f"{self.prefix}page-{number:03d}.png"

    @property
    def stitched(self) -> str:
        return f"{self.prefix}stitched.png"

    @property
    def page_keys(self) -> str:
        """The manifest, written last: its presence means the render is complete."""
        return f"{self.prefix}page_keys.json"

    @property
    def text_layer(self) -> str:
        return f"{self.prefix}text_layer.json"

    def ocr(self, lang: str, dpi: int) -> str:
        """Cached OCR text per page, so a retried job does not run tesseract again."""
        safe = re.sub(r"[^A-Za-z0-9_+]", "_", lang)
        return f"{self.prefix}ocr-{safe}-{dpi}.json"
