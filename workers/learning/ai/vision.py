"""Page images → text, for the vision handler.

Engines:
- `stub`: no model. The PDF's text layer when it has one (real text: recorded as
  `text_layer`), else a deterministic placeholder derived from the image bytes that says
  it is one, `[Placeholder: no text recognised ...]` (tests, demos, `AI_BACKEND=stub`).
- `ollama`: one `/api/chat` call with every page image and an OCR prompt.
- `tesseract`: offline OCR through `workers.learning.ocr_tesseract`.

Environment (read by `VisionSettings.from_env` and `vision_engine`):
- `AI_VISION_BACKEND`: stub | ollama | tesseract; unset → derived from `AI_BACKEND`
  (stub → stub, local → ollama); default stub.
- `OLLAMA_BASE_URL` (default http://localhost:11434), `AI_VISION_MODEL` (no default:
  operators choose the model deliberately; required by the ollama engine).
- `AI_CONNECT_TIMEOUT` (5 s), `AI_VISION_READ_TIMEOUT` else `AI_READ_TIMEOUT` (120 s).
- `AI_KEEP_ALIVE`: how long Ollama keeps the model loaded ("5m", "-1"; unset =
  Ollama's default).
- `AI_VISION_OPTIONS`: JSON object of Ollama model options (`{"num_ctx": 8192}`).
- `OCR_LANG`: tesseract languages (default deu+eng).

`read_pages` returns the text and what produced it (`VisionResult.backend_used`):
`stub` (the placeholder), `text_layer` (the PDF's own text), `ollama` or `tesseract`;
the vision handler stores it as the submission's `text_backend`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from workers.core.errors import PermanentError
from workers.learning.ai import ai_backend, ollama

Engine = Literal["stub", "ollama", "tesseract"]
ENGINES: tuple[str, ...] = ("stub", "ollama", "tesseract")
RETRY_CODE = "vision_retrying"
FAIL_CODE = "vision_failed"

# German first: the students write German; the model must not translate or fix.
OCR_PROMPT = (
    "Du bist ein OCR-System. Transkribiere den gesamten Text auf den Bildern wortgetreu, "
    "Seite für Seite in der gegebenen Reihenfolge. Behalte Rechtschreibung, Zeichensetzung "
    "und Fehler genau bei; übersetze, korrigiere und kommentiere nichts. Gib das Ergebnis "
    "als Markdown aus (Überschriften, Listen, Tabellen wie im Original; Formeln als LaTeX). "
    "Unleserliche Stellen markierst du mit [unleserlich]. Antworte nur mit der Transkription.\n"
    "Transcribe faithfully, in markdown, without translating or correcting."
)


# What `VisionResult.backend_used` says when the text is the PDF's own text layer.
TEXT_LAYER = "text_layer"


@dataclass(frozen=True)
class VisionResult:
    text: str
    backend_used: str  # "stub" (a placeholder) | "text_layer" | "ollama" | "tesseract"


@dataclass(frozen=True)
class VisionSettings:
    base_url: str = ollama.DEFAULT_BASE_URL
    model: str = ""
    timeout: ollama.Timeout = (ollama.DEFAULT_CONNECT_TIMEOUT, ollama.DEFAULT_READ_TIMEOUT)
    keep_alive: str | float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    ocr_lang: str = "deu+eng"

    @classmethod
    def from_env(cls, **overrides: Any) -> VisionSettings:
        """Settings from the environment; keyword arguments win (e.g. `options=`)."""
        values: dict[str, Any] = {
            "base_url": ollama.base_url_from_env(),
            "model": os.environ.get("AI_VISION_MODEL", "").strip(),
            "timeout": ollama.timeout_from_env("vision"),
            "keep_alive": ollama.keep_alive_from_env(),
            "options": ollama.options_from_env("AI_VISION_OPTIONS"),
            "ocr_lang": os.environ.get("OCR_LANG") or "deu+eng",
        }
        values.update(overrides)
        return cls(**values)


def vision_engine() -> Engine:
    """AI_VISION_BACKEND, else AI_BACKEND (stub → stub, local → ollama); default stub."""
    explicit = (os.environ.get("AI_VISION_BACKEND") or "").strip().lower()
    if explicit:
        if explicit not in ENGINES:
            raise ValueError(f"AI_VISION_BACKEND must be one of {', '.join(ENGINES)}, got {explicit!r}")
        return explicit  # type: ignore[return-value]
    return "ollama" if ai_backend() == "local" else "stub"


def read_pages(
    images: list[bytes],
    *,
    engine: Engine,
    text_layer: str | None,
    settings: VisionSettings,
) -> VisionResult:
    """The text of the pages and what produced it. `text_layer` is what the PDF already
    carries (the stub uses it; the model engines only when there is no page image).

    Raises `TransientError("vision_retrying", ...)` / `PermanentError("vision_failed", ...)`.
    """
    has_layer = bool(text_layer and text_layer.strip())
    if engine == "stub":
        if has_layer:
            return VisionResult(text_layer or "", TEXT_LAYER)
        return VisionResult(_placeholder(images), "stub")
    if not images:
        if has_layer:
            return VisionResult(text_layer or "", TEXT_LAYER)
        raise PermanentError(FAIL_CODE, "no page images to read")
    if engine == "ollama":
        return VisionResult(_ollama(images, settings), "ollama")
    if engine == "tesseract":
        return VisionResult(_tesseract(images, settings), "tesseract")
    raise PermanentError(FAIL_CODE, f"unknown vision engine {engine!r}")


def extract_text(
    images: list[bytes],
    *,
    engine: Engine,
    text_layer: str | None,
    settings: VisionSettings,
) -> str:
    """The text of the pages (`read_pages` without saying what produced it)."""
    return read_pages(images, engine=engine, text_layer=text_layer, settings=settings).text


def _placeholder(images: list[bytes]) -> str:
    """The stub's stand-in for OCR: says what it is first, in words, since it becomes the
    submission's text; deterministic (the pages' hash), so a retry stores the same."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(hashlib.sha256(image).digest())
    n = len(images)
    pages = f"{n} page" if n == 1 else f"{n} pages"
    return (f"[Placeholder: no text recognised. The stub backend (AI_BACKEND=stub) reads no "
            f"images; set AI_BACKEND=local for OCR. {pages}, {digest.hexdigest()[:12]}]")


def _ollama(images: list[bytes], settings: VisionSettings) -> str:
    if not settings.model:
        raise PermanentError(FAIL_CODE, "AI_VISION_MODEL is not set")
    # Temperature 0: a transcription should not vary between retries.
    options = {"temperature": 0, **settings.options}
    messages = [{"role": "user", "content": OCR_PROMPT}]
    text = ollama.chat(
        settings.base_url, settings.model, messages, images=images, options=options,
        keep_alive=settings.keep_alive, timeout=settings.timeout,
        retry_code=RETRY_CODE, fail_code=FAIL_CODE,
    )
    return text.strip()


def _tesseract(images: list[bytes], settings: VisionSettings) -> str:
    try:
        from workers.learning.ocr_tesseract import ocr_images
    except ImportError:
        raise PermanentError(FAIL_CODE, "tesseract engine is not installed") from None
    return ocr_images(images, settings.ocr_lang)
