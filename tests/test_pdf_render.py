"""PDF/photo rendering into storage: derivatives, reuse on retry, limits, invalid input."""

from __future__ import annotations

import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pymupdf
import pytest

from workers.core.errors import PayloadError, PermanentError
from workers.learning import pdf_render
from workers.learning.ocr_tesseract import tesseract_available
from workers.learning.pdf_render import extract_pdf, prepare_image, render_pdf
from workers.learning.storage import DerivedPaths, LocalStorage, content_hash

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NO_TESSERACT = "tesseract binary not installed (apt-get install tesseract-ocr tesseract-ocr-deu)"


def make_pdf(*texts: str, width: float = 595, height: float = 842) -> bytes:
    doc = pymupdf.open()
    for text in texts:
        page = doc.new_page(width=width, height=height)
        page.insert_text((72, 100), text, fontsize=14)
    return doc.tobytes()


def text_as_png(text: str, dpi: int = 200) -> bytes:
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_text((72, 100), text, fontsize=20)
    return page.get_pixmap(dpi=dpi).tobytes("png")


def make_scanned_pdf(text: str) -> bytes:
    """A page that is only a picture of text: no text layer, like a phone scan."""
    doc = pymupdf.open()
    page = doc.new_page()
    page.insert_image(page.rect, stream=text_as_png(text))
    return doc.tobytes()


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "storage")


def reason(exc: pytest.ExceptionInfo[PermanentError]) -> str:
    assert exc.value.code == "pdf_invalid"
    return exc.value.message


# ---------------------------------------------------------------- render


def test_render_stores_page_pngs_stitched_overview_and_text_layer(store: LocalStorage) -> None:
    data = make_pdf("Erste Seite", "Zweite Seite", "Dritte Seite")
    calls: list[tuple[float, str]] = []
    result = render_pdf(data, store, dpi=72, progress=lambda f, m: calls.append((f, m)))

    paths = DerivedPaths(content_hash(data))
    assert result.content_hash == paths.hash
    assert result.page_count == 3
    assert result.page_keys == [paths.page(1), paths.page(2), paths.page(3)]
    assert result.stitched_key == paths.stitched
    assert result.cached is False
    for key in [*result.page_keys, result.stitched_key]:
        assert store.read(key).startswith(PNG_MAGIC)
    assert [t.strip() for t in result.text_layer] == ["Erste Seite", "Zweite Seite", "Dritte Seite"]
    assert json.loads(store.read(paths.text_layer)) == result.text_layer
    manifest = json.loads(store.read(paths.page_keys))
    assert manifest["page_keys"] == result.page_keys

    page = pymupdf.Pixmap(store.read(paths.page(1)))
    stitched = pymupdf.Pixmap(store.read(paths.stitched))
    assert (page.width, page.height) == (595, 842)  # A4 at 72 dpi
    assert (stitched.width, stitched.height) == (595, 3 * 842)
    assert calls[-1] == (1.0, "render complete")
    assert [f for f, _ in calls] == sorted(f for f, _ in calls)


def test_second_render_of_same_bytes_is_cached_and_renders_nothing(
    store: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_pdf("eins", "zwei")
    first = render_pdf(data, store)
    mtimes = {k: store.path(k).stat().st_mtime_ns for k in first.page_keys}

    rendered: list[int] = []
    real = pdf_render._render_page
    monkeypatch.setattr(
        pdf_render, "_render_page", lambda page, zoom: rendered.append(1) or real(page, zoom)
    )
    monkeypatch.setattr(pymupdf, "open", lambda *a, **k: pytest.fail("document reopened"))
    second = render_pdf(data, store)

    assert second.cached is True
    assert rendered == []
    assert {k: store.path(k).stat().st_mtime_ns for k in second.page_keys} == mtimes
    assert (second.page_keys, second.stitched_key, second.text_layer) == (
        first.page_keys,
        first.stitched_key,
        first.text_layer,
    )


def test_interrupted_render_without_manifest_is_redone(store: LocalStorage) -> None:
    data = make_pdf("eins", "zwei")
    first = render_pdf(data, store)
    # A worker that died after writing pages but before the manifest.
    store.path(DerivedPaths(first.content_hash).page_keys).unlink()
    store.path(first.page_keys[1]).unlink()
    again = render_pdf(data, store)
    assert again.cached is False
    assert store.exists(first.page_keys[1])
    assert render_pdf(data, store).cached is True


def test_pruned_derivative_invalidates_cache(store: LocalStorage) -> None:
    data = make_pdf("eins")
    first = render_pdf(data, store)
    store.path(first.stitched_key).unlink()
    assert render_pdf(data, store).cached is False


def test_other_dpi_renders_again(store: LocalStorage) -> None:
    data = make_pdf("eins")
    render_pdf(data, store, dpi=72)
    again = render_pdf(data, store, dpi=144)
    assert again.cached is False
    assert pymupdf.Pixmap(store.read(again.page_keys[0])).width == 2 * 595


def test_cached_render_without_stitch_is_rerendered_when_stitch_is_wanted(
    store: LocalStorage,
) -> None:
    data = make_pdf("eins")
    assert render_pdf(data, store, stitch=False).stitched_key is None
    again = render_pdf(data, store, stitch=True)
    assert again.cached is False
    assert again.stitched_key is not None


def test_stitched_overview_is_scaled_down_to_the_height_cap(
    store: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pdf_render, "MAX_STITCH_HEIGHT", 1000)
    result = render_pdf(make_pdf("a", "b", "c", "d"), store, dpi=72)
    stitched = pymupdf.Pixmap(store.read(result.stitched_key))
    assert 900 <= stitched.height <= 1000
    # Page PNGs keep the full requested resolution.
    assert pymupdf.Pixmap(store.read(result.page_keys[0])).height == 842


def test_huge_page_is_rendered_within_the_pixel_cap(
    store: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pdf_render, "MAX_PAGE_PIXELS", 1_000_000)
    result = render_pdf(make_pdf("Poster", width=5000, height=5000), store, dpi=150)
    page = pymupdf.Pixmap(store.read(result.page_keys[0]))
    assert page.width * page.height <= 1_000_000


def test_mixed_page_sizes_are_centred_on_a_white_canvas(store: LocalStorage) -> None:
    doc = pymupdf.open()
    doc.new_page(width=200, height=100)
    doc.new_page(width=100, height=100)
    result = render_pdf(doc.tobytes(), store, dpi=72)
    stitched = pymupdf.Pixmap(store.read(result.stitched_key))
    assert (stitched.width, stitched.height) == (200, 200)
    assert stitched.pixel(10, 150) == (255, 255, 255)


def test_renders_from_several_job_threads_do_not_interfere(store: LocalStorage) -> None:
    # A worker runs `concurrency` jobs in threads; MuPDF itself is not thread-safe.
    inputs = [make_pdf(f"Abgabe {n}", f"Seite {n}") for n in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda d: render_pdf(d, store, dpi=72), inputs))
    for n, result in enumerate(results):
        assert [t.strip() for t in result.text_layer] == [f"Abgabe {n}", f"Seite {n}"]
        assert all(store.exists(k) for k in result.page_keys)


# ---------------------------------------------------------------- invalid input


def test_empty_bytes_are_pdf_invalid(store: LocalStorage) -> None:
    with pytest.raises(PermanentError) as exc:
        render_pdf(b"", store)
    assert reason(exc) == "empty file"


def test_zero_page_pdf_is_pdf_invalid(store: LocalStorage) -> None:
    zero = (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\n"
        b"trailer<</Root 1 0 R>>\n%%EOF\n"
    )
    with pytest.raises(PermanentError) as exc:
        render_pdf(zero, store)
    assert reason(exc) == "no pages"


@pytest.mark.parametrize(
    "data", [b"hello, not a pdf", text_as_png("x", dpi=20), b"PK\x03\x04zipfile"]
)
def test_non_pdf_is_pdf_invalid(store: LocalStorage, data: bytes) -> None:
    with pytest.raises(PermanentError) as exc:
        render_pdf(data, store)
    assert reason(exc) == "not a PDF"


def test_corrupt_pdf_is_pdf_invalid(store: LocalStorage) -> None:
    with pytest.raises(PermanentError) as exc:
        render_pdf(b"%PDF-1.7\n" + bytes(range(256)) * 20, store)
    assert reason(exc) == "corrupt or unreadable PDF"


def test_encrypted_pdf_is_pdf_invalid_without_leaking_text(store: LocalStorage) -> None:
    doc = pymupdf.open(stream=make_pdf("Geheime Abgabe von Max Mustermann"), filetype="pdf")
    data = doc.tobytes(encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")
    with pytest.raises(PermanentError) as exc:
        render_pdf(data, store)
    assert reason(exc) == "encrypted (password required)"
    assert "Mustermann" not in str(exc.value)
    assert not store.root.exists()  # refused before anything was stored


def test_too_many_pages_is_pdf_invalid(store: LocalStorage) -> None:
    with pytest.raises(PermanentError) as exc:
        render_pdf(make_pdf("1", "2", "3"), store, max_pages=2)
    assert reason(exc) == "too many pages: 3 > 2"


def test_page_limit_also_applies_to_a_cached_render(store: LocalStorage) -> None:
    data = make_pdf("1", "2", "3")
    render_pdf(data, store)
    with pytest.raises(PermanentError) as exc:
        render_pdf(data, store, max_pages=2)
    assert reason(exc) == "too many pages: 3 > 2"


def test_too_large_is_pdf_invalid(store: LocalStorage) -> None:
    data = make_pdf("1")
    with pytest.raises(PermanentError) as exc:
        render_pdf(data, store, max_bytes=100)
    assert reason(exc) == f"too large: {len(data)} bytes > 100"


@pytest.mark.parametrize("dpi", [0, 10, 5000, 150.5, True])
def test_unreasonable_dpi_is_a_payload_error(store: LocalStorage, dpi: object) -> None:
    with pytest.raises(PayloadError):
        render_pdf(make_pdf("1"), store, dpi=dpi)  # type: ignore[arg-type]


# ---------------------------------------------------------------- photos


def exif_orientation_jpeg(orientation: int) -> bytes:
    """A 300x200 JPEG whose EXIF says 'rotate for display' (as phones write it)."""
    pix = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, 300, 200), False)
    pix.clear_with(200)
    jpeg = pix.tobytes("jpeg")
    ifd = b"MM\x00*\x00\x00\x00\x08\x00\x01"
    ifd += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + b"\x00\x00\x00\x00"
    app1 = b"Exif\x00\x00" + ifd
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_photo_becomes_page_one_with_the_pdf_shape(store: LocalStorage) -> None:
    data = text_as_png("Foto")
    result = prepare_image(data, store)
    paths = DerivedPaths(content_hash(data))
    assert result.page_keys == [paths.page(1)]
    assert result.stitched_key == paths.page(1)
    assert result.page_count == 1 and result.text_layer == [""]
    stored = pymupdf.Pixmap(store.read(paths.page(1)))
    original = pymupdf.Pixmap(data)
    assert (stored.width, stored.height) == (original.width, original.height)
    assert prepare_image(data, store).cached is True


def test_jpeg_exif_orientation_is_applied(store: LocalStorage) -> None:
    result = prepare_image(exif_orientation_jpeg(6), store)
    stored = pymupdf.Pixmap(store.read(result.page_keys[0]))
    assert (stored.width, stored.height) == (200, 300)


def test_large_photo_is_scaled_to_max_side(store: LocalStorage) -> None:
    result = prepare_image(exif_orientation_jpeg(1), store, max_side=150)
    stored = pymupdf.Pixmap(store.read(result.page_keys[0]))
    assert (stored.width, stored.height) == (150, 100)


def test_decompression_bomb_is_refused_from_its_header(store: LocalStorage) -> None:
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    png = PNG_MAGIC + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    with pytest.raises(PermanentError, match="image too large: 100000x100000") as exc:
        prepare_image(png + b"\x00" * 100, store)
    assert exc.value.code == "image_invalid"


@pytest.mark.parametrize("data", [b"", make_pdf("x"), b"GIF89a...."])
def test_non_image_is_image_invalid(store: LocalStorage, data: bytes) -> None:
    with pytest.raises(PermanentError) as exc:
        prepare_image(data, store)
    assert exc.value.code == "image_invalid"


@pytest.mark.parametrize("cut", [40, 0.5])
def test_truncated_image_is_image_invalid(store: LocalStorage, cut: float) -> None:
    png = text_as_png("x")
    with pytest.raises(PermanentError) as exc:
        prepare_image(png[: int(cut if cut > 1 else len(png) * cut)], store)
    assert exc.value.code == "image_invalid"
    assert not store.root.exists()


# ---------------------------------------------------------------- extract_pdf (seed 003)


def test_extract_text_returns_pages_and_ignores_caller_parameters(store: LocalStorage) -> None:
    result = extract_pdf(
        make_pdf("Seite eins", "Seite zwei"),
        extraction_method="text",
        storage=store,
        template="essay",
        context={"course": 7},
    )
    assert [p["text"].strip() for p in result["pages"]] == ["Seite eins", "Seite zwei"]
    assert result["page_count"] == 2
    assert result["text"] == "Seite eins\n\nSeite zwei"
    assert "image_keys" not in result
    assert not store.root.exists()  # text only: nothing rendered or stored
    json.dumps(result)


def test_extract_with_images_returns_storage_keys(store: LocalStorage) -> None:
    result = extract_pdf(make_pdf("a", "b"), include_images=True, storage=store)
    assert result["image_keys"] == [p["image_key"] for p in result["pages"]]
    assert all(store.read(k).startswith(PNG_MAGIC) for k in result["image_keys"])
    json.dumps(result)


def test_extract_uses_storage_dir_when_no_storage_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_DIR", str(tmp_path / "env-store"))
    result = extract_pdf(make_pdf("a"), include_images=True)
    assert (tmp_path / "env-store" / result["image_keys"][0]).is_file()


@pytest.mark.parametrize("method", ["pdf", "", "TEXT"])
def test_extract_rejects_unknown_method(method: str) -> None:
    with pytest.raises(PayloadError, match="extraction_method"):
        extract_pdf(make_pdf("a"), extraction_method=method)


def test_extract_invalid_pdf_is_pdf_invalid() -> None:
    with pytest.raises(PermanentError) as exc:
        extract_pdf(b"not a pdf")
    assert reason(exc) == "not a PDF"


@pytest.mark.skipif(not tesseract_available(), reason=NO_TESSERACT)
def test_extract_both_falls_back_to_ocr_for_scanned_pages(store: LocalStorage) -> None:
    doc = pymupdf.open(stream=make_pdf("Getippte Seite"), filetype="pdf")
    doc.insert_pdf(pymupdf.open(stream=make_scanned_pdf("Gescannte Seite"), filetype="pdf"))
    result = extract_pdf(
        doc.tobytes(), extraction_method="both", dpi=200, ocr_lang="deu", storage=store
    )
    typed, scanned = result["pages"]
    assert typed["text"].strip() == "Getippte Seite"
    assert scanned["text_layer"].strip() == ""
    assert "Gescannte Seite" in scanned["ocr_text"]
    assert scanned["text"] == scanned["ocr_text"]
    json.dumps(result)


@pytest.mark.skipif(not tesseract_available(), reason=NO_TESSERACT)
def test_extract_ocr_retry_reuses_stored_ocr(
    store: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = make_scanned_pdf("Wiederholung")
    first = extract_pdf(data, extraction_method="ocr", dpi=200, ocr_lang="deu", storage=store)
    assert "Wiederholung" in first["text"]
    monkeypatch.setattr(pdf_render, "ocr_image", lambda *a, **k: pytest.fail("OCR ran again"))
    assert (
        extract_pdf(data, extraction_method="ocr", dpi=200, ocr_lang="deu", storage=store) == first
    )
