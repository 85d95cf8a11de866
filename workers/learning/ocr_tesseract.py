"""Offline OCR with the tesseract command-line tool.

Why a subprocess and not PyMuPDF's built-in OCR (`Pixmap.pdfocr_tobytes`)?
- A timeout can actually stop it: the child is killed. An in-process C call
  cannot be interrupted, and a hung page would pin the job until the hard timeout
  recycles the whole worker process.
- A crash in tesseract/leptonica on a hostile image kills only the child, not
  the worker with its other in-flight jobs.
- The worker's threads keep running (heartbeats, lease extension) while OCR runs;
  an in-process OCR call may hold the GIL for seconds.
- The distribution's binary and its language packs are installed and versioned
  together (`tesseract-ocr`, `tesseract-ocr-deu`), so there is no TESSDATA_PREFIX
  to guess and no mismatch with the tesseract built into the PyMuPDF wheel.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shutil
import subprocess

from workers.core.errors import PermanentError, TransientError

log = logging.getLogger("jobvisor.ocr")

DEFAULT_LANG = "deu+eng"
DEFAULT_TIMEOUT_S = 120.0
_LANG_RE = re.compile(r"^[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*$")
# Tesseract reads non-image input as a *list of file names* and would open those
# files; so only bytes that are unmistakably an image are ever handed over.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")


def _tesseract_cmd() -> str:
    return os.environ.get("TESSERACT_CMD") or "tesseract"


def _timeout_s() -> float:
    raw = os.environ.get("OCR_TIMEOUT_S")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        return DEFAULT_TIMEOUT_S


def tesseract_available() -> bool:
    """True when the tesseract binary can be found (TESSERACT_CMD or PATH)."""
    return shutil.which(_tesseract_cmd()) is not None


@functools.lru_cache(maxsize=4)
def _languages(cmd: str) -> frozenset[str]:
    proc = subprocess.run(
        [cmd, "--list-langs"], capture_output=True, timeout=30, check=False, env=_child_env()
    )
    lines = proc.stdout.decode("utf-8", "replace").splitlines()
    # First line is the header "List of available languages in ...".
    return frozenset(line.strip() for line in lines[1:] if line.strip())


def tesseract_languages() -> frozenset[str]:
    """Installed language packs; empty when tesseract is missing."""
    cmd = shutil.which(_tesseract_cmd())
    if cmd is None:
        return frozenset()
    try:
        return _languages(cmd)
    except (OSError, subprocess.SubprocessError):
        return frozenset()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Tesseract's OpenMP threads fight each other when several jobs OCR at once;
    # one thread per process is faster overall (tesseract's own advice).
    env.setdefault("OMP_THREAD_LIMIT", "1")
    return env


def require_tesseract(lang: str = DEFAULT_LANG) -> str:
    """Path of the tesseract binary; PermanentError when it or a language is missing."""
    if not _LANG_RE.match(lang):
        raise PermanentError("vision_failed", "invalid OCR language spec")
    cmd = shutil.which(_tesseract_cmd())
    if cmd is None:
        raise PermanentError(
            "vision_failed",
            "tesseract not installed (apt-get install tesseract-ocr tesseract-ocr-deu)",
        )
    installed = tesseract_languages()
    if not installed:
        raise PermanentError("vision_failed", "tesseract reports no language data")
    missing = sorted(set(lang.split("+")) - installed)
    if missing:
        packs = " ".join(f"tesseract-ocr-{m}" for m in missing)
        raise PermanentError(
            "vision_failed", f"tesseract language data missing: {','.join(missing)} ({packs})"
        )
    return cmd


def ocr_image(image: bytes, lang: str = DEFAULT_LANG, *, timeout_s: float | None = None) -> str:
    """OCR one PNG or JPEG image; returns its text with trailing whitespace removed."""
    cmd = require_tesseract(lang)
    if not image.startswith(_IMAGE_MAGIC):
        raise PermanentError("vision_failed", "OCR input is not a PNG or JPEG image")
    timeout = timeout_s if timeout_s is not None else _timeout_s()
    try:
        proc = subprocess.run(
            [cmd, "stdin", "stdout", "-l", lang],
            input=image,
            capture_output=True,
            timeout=timeout,
            check=False,
            env=_child_env(),
        )
    except subprocess.TimeoutExpired:
        # Likely an overloaded machine rather than a bad image: let the queue retry.
        raise TransientError("vision_failed", f"tesseract timed out after {timeout:g}s") from None
    except OSError as exc:
        raise PermanentError(
            "vision_failed", f"tesseract could not start: {exc.strerror}"
        ) from None
    if proc.returncode != 0:
        # stderr carries leptonica/tesseract diagnostics, never recognised text.
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = detail[-1][:200] if detail else f"exit status {proc.returncode}"
        raise PermanentError("vision_failed", f"tesseract failed: {reason}")
    return proc.stdout.decode("utf-8", "replace").replace("\f", "").rstrip()


def ocr_images(images: list[bytes], lang: str = DEFAULT_LANG) -> str:
    """OCR several images (pages, in order); texts are joined by a blank line."""
    texts = []
    for index, image in enumerate(images, start=1):
        texts.append(ocr_image(image, lang))
        log.debug("ocr image %d/%d done (%d chars)", index, len(images), len(texts[-1]))
    return "\n\n".join(texts)
