"""Offline OCR through the tesseract binary: German text, errors, timeouts."""

from __future__ import annotations

from pathlib import Path

import pymupdf
import pytest

from workers.core.errors import PermanentError, TransientError
from workers.learning.ocr_tesseract import (
    ocr_image,
    ocr_images,
    require_tesseract,
    tesseract_available,
    tesseract_languages,
)

NO_TESSERACT = "tesseract binary not installed (apt-get install tesseract-ocr tesseract-ocr-deu)"
needs_tesseract = pytest.mark.skipif(not tesseract_available(), reason=NO_TESSERACT)
needs_german = pytest.mark.skipif(
    "deu" not in tesseract_languages(), reason="German tessdata missing (tesseract-ocr-deu)"
)


def rendered_page(*lines: str, dpi: int = 300) -> bytes:
    """A PDF page with readable text, rendered the way the pdf handler renders it."""
    doc = pymupdf.open()
    page = doc.new_page()
    for number, line in enumerate(lines):
        page.insert_text((72, 100 + 40 * number), line, fontsize=16)
    return page.get_pixmap(dpi=dpi).tobytes("png")


def fake_tesseract(tmp_path: Path, body: str) -> str:
    """A stand-in binary: lists 'deu' like the real one, then runs `body`."""
    script = tmp_path / "tesseract"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--list-langs" ]; then\n'
        "  echo 'List of available languages (1):'; echo deu; exit 0\n"
        "fi\n" + body + "\n"
    )
    script.chmod(0o755)
    return str(script)


@needs_tesseract
@needs_german
def test_german_umlauts_and_sharp_s_are_read_exactly() -> None:
    text = ocr_image(rendered_page("Größe Übung Äpfel Straße"), lang="deu")
    assert text.split() == ["Größe", "Übung", "Äpfel", "Straße"]


@needs_tesseract
@needs_german
def test_several_pages_come_back_in_order() -> None:
    text = ocr_images(
        [rendered_page("Öl müssen heißen", dpi=200), rendered_page("Zweite Seite", dpi=200)],
        lang="deu+eng",
    )
    first, second = text.split("\n\n")
    assert first.split() == ["Öl", "müssen", "heißen"]
    assert second.split() == ["Zweite", "Seite"]


@needs_tesseract
def test_missing_language_pack_names_the_debian_package() -> None:
    with pytest.raises(PermanentError, match="tesseract-ocr-xyz") as exc:
        ocr_image(rendered_page("x"), lang="deu+xyz")
    assert exc.value.code == "vision_failed"


def test_missing_binary_is_a_permanent_vision_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERACT_CMD", "/nonexistent/tesseract")
    assert tesseract_available() is False
    with pytest.raises(PermanentError, match="tesseract not installed") as exc:
        ocr_images([rendered_page("x", dpi=72)])
    assert exc.value.code == "vision_failed"


@pytest.mark.parametrize("lang", ["", "deu eng", "-c", "deu+", "../deu"])
def test_language_spec_cannot_smuggle_arguments(lang: str) -> None:
    with pytest.raises(PermanentError, match="invalid OCR language"):
        require_tesseract(lang)


def test_non_image_input_never_reaches_tesseract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tesseract would read a text "image" as a list of file paths to open.
    marker = tmp_path / "ran"
    monkeypatch.setenv("TESSERACT_CMD", fake_tesseract(tmp_path, f"touch {marker}"))
    with pytest.raises(PermanentError, match="not a PNG or JPEG"):
        ocr_image(b"/etc/passwd\n", lang="deu")
    assert not marker.exists()


def test_hung_tesseract_is_killed_and_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TESSERACT_CMD", fake_tesseract(tmp_path, "exec sleep 30"))
    with pytest.raises(TransientError, match="timed out") as exc:
        ocr_image(rendered_page("x", dpi=72), lang="deu", timeout_s=0.5)
    assert exc.value.code == "vision_failed"


def test_tesseract_failure_is_permanent_with_its_diagnostic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = "echo 'Error in pixReadMem: Unknown format' >&2; exit 1"
    monkeypatch.setenv("TESSERACT_CMD", fake_tesseract(tmp_path, body))
    with pytest.raises(PermanentError, match="Unknown format") as exc:
        ocr_image(rendered_page("x", dpi=72), lang="deu")
    assert exc.value.code == "vision_failed"


def test_timeout_comes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERACT_CMD", fake_tesseract(tmp_path, "exec sleep 30"))
    monkeypatch.setenv("OCR_TIMEOUT_S", "0.3")
    with pytest.raises(TransientError, match=r"after 0\.3s"):
        ocr_image(rendered_page("x", dpi=72), lang="deu")
