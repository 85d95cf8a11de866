"""Turn a submitted PDF or photo into page PNGs, a stitched overview and a text layer.

Everything derived from an input is stored under `derived/<sha256 of the bytes>/`
(see `workers.learning.storage.DerivedPaths`). The manifest `page_keys.json` is written
last, so its presence means a render finished; a retried job finds it and reuses
the pages instead of rendering again.

Errors are `PermanentError("pdf_invalid" | "image_invalid", reason)`: a bad file
stays bad on retry. Reasons are short and never quote document text.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import pymupdf

from workers.core.errors import PayloadError, PermanentError
from workers.learning.ocr_tesseract import DEFAULT_LANG, ocr_image, require_tesseract
from workers.learning.storage import DerivedPaths, Storage, content_hash, storage_from_env

log = logging.getLogger("jobvisor.pdf")

Progress = Callable[[float, str], None]

MiB = 1024 * 1024
DEFAULT_MAX_BYTES = 25 * MiB
DEFAULT_DPI = 150
MIN_DPI, MAX_DPI = 36, 600
# One page never renders to more than this many pixels (about 120 MB as RGB):
# a poster-sized page would otherwise ask for gigabytes at the requested dpi.
MAX_PAGE_PIXELS = 40_000_000
# The stitched overview is scaled down (never cropped) to stay within both limits.
# 20k px is what image viewers and vision models still accept; 40 MP bounds memory.
MAX_STITCH_HEIGHT = 20_000
MAX_STITCH_PIXELS = 40_000_000
# Photos: dimensions are read from the file header *before* decoding, so a
# decompression bomb (tiny file, huge canvas) is refused without allocating it.
MAX_IMAGE_PIXELS = 60_000_000
DEFAULT_MAX_SIDE = 4096
MANIFEST_VERSION = 1
EXTRACTION_METHODS = ("text", "ocr", "both")

# PyMuPDF is not thread-safe (its docs: concurrent calls "may crash Python itself"),
# and a worker process runs `concurrency` jobs in threads. Every MuPDF call in this
# module runs under this lock; other code in the process that uses pymupdf should
# take it too. It costs little: PyMuPDF holds the GIL while it works anyway.
MUPDF_LOCK = threading.RLock()

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass(frozen=True)
class RenderResult:
    content_hash: str
    page_count: int
    page_keys: list[str]
    stitched_key: str | None
    text_layer: list[str] = field(repr=False)  # document text: keep it out of reprs/logs
    cached: bool
    dpi: int | None = None  # None for photos, which keep their own resolution

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _noop(_fraction: float, _message: str) -> None:
    pass


# ---------------------------------------------------------------- validation


def _check_limits(data: bytes, max_bytes: int, code: str) -> None:
    if not data:
        raise PermanentError(code, "empty file")
    if len(data) > max_bytes:
        raise PermanentError(code, f"too large: {len(data)} bytes > {max_bytes}")


def _open_pdf(data: bytes, *, max_bytes: int, max_pages: int) -> pymupdf.Document:
    _check_limits(data, max_bytes, "pdf_invalid")
    # The PDF spec allows junk before the header and MuPDF tolerates it, but
    # without a header anywhere near the start this is not a PDF at all.
    if b"%PDF-" not in data[:1024]:
        raise PermanentError("pdf_invalid", "not a PDF")
    try:
        doc = pymupdf.open(stream=data, filetype="pdf")
    except MemoryError:
        raise
    except Exception:
        raise PermanentError("pdf_invalid", "corrupt or unreadable PDF") from None
    try:
        if doc.needs_pass:
            raise PermanentError("pdf_invalid", "encrypted (password required)")
        if doc.page_count == 0:
            raise PermanentError("pdf_invalid", "no pages")
        if doc.page_count > max_pages:
            raise PermanentError("pdf_invalid", f"too many pages: {doc.page_count} > {max_pages}")
    except BaseException:
        doc.close()
        raise
    return doc


def _check_dpi(dpi: int) -> None:
    if not isinstance(dpi, int) or isinstance(dpi, bool) or not MIN_DPI <= dpi <= MAX_DPI:
        raise PayloadError(f"dpi must be an integer in {MIN_DPI}..{MAX_DPI}")


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header, without decoding pixels."""
    if data.startswith(_PNG_MAGIC):
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return struct.unpack(">II", data[16:24])
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without length
            i += 2
            continue
        if marker == 0xDA:  # start of scan: no frame header came before it
            return None
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        # SOF0..SOF15 carry the frame size; C4 (DHT), C8 (JPG), CC (DAC) do not.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    return None


# ---------------------------------------------------------------- cache


def _load_cached(
    storage: Storage, paths: DerivedPaths, *, kind: str, params: dict[str, Any], stitch: bool
) -> RenderResult | None:
    """The recorded render, if it is complete and made with the same parameters."""
    if not storage.exists(paths.page_keys):
        return None
    try:
        manifest = json.loads(storage.read(paths.page_keys))
        texts = json.loads(storage.read(manifest["text_layer_key"]))
        if (
            manifest.get("version") != MANIFEST_VERSION
            or manifest.get("kind") != kind
            or manifest.get("params") != params
        ):
            return None
        keys = list(manifest["page_keys"])
        stitched = manifest.get("stitched_key")
        if stitch and not stitched:
            return None
        if not all(storage.exists(k) for k in [*keys, *([stitched] if stitched else [])]):
            return None  # someone pruned part of it: render again
    except (ValueError, KeyError, TypeError, FileNotFoundError):
        return None
    return RenderResult(
        content_hash=paths.hash,
        page_count=len(keys),
        page_keys=keys,
        stitched_key=stitched,
        text_layer=list(texts),
        cached=True,
        dpi=params.get("dpi"),
    )


def _store_manifest(
    storage: Storage, paths: DerivedPaths, result: RenderResult, *, kind: str, params: dict
) -> None:
    storage.write(paths.text_layer, json.dumps(result.text_layer, ensure_ascii=False).encode())
    manifest = {
        "version": MANIFEST_VERSION,
        "kind": kind,
        "params": params,
        "page_keys": result.page_keys,
        "stitched_key": result.stitched_key,
        "text_layer_key": paths.text_layer,
    }
    # Last write of a render: until it exists, a retry renders from scratch.
    storage.write(paths.page_keys, json.dumps(manifest).encode())


# ---------------------------------------------------------------- PDF


def _page_zoom(page: pymupdf.Page, dpi: float) -> float:
    area = max(page.rect.width * page.rect.height, 1.0)
    return min(dpi / 72.0, math.sqrt(MAX_PAGE_PIXELS / area))


def _pixel_size(page: pymupdf.Page, zoom: float) -> tuple[int, int]:
    irect = (page.rect * pymupdf.Matrix(zoom, zoom)).irect
    return irect.width, irect.height


def _render_page(page: pymupdf.Page, zoom: float) -> pymupdf.Pixmap:
    try:
        return page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
    except MemoryError:
        raise
    except Exception:
        raise PermanentError(
            "pdf_invalid", f"page {page.number + 1} could not be rendered"
        ) from None


@dataclass
class _Stitch:
    """Pages stacked top to bottom, centred, on a white canvas of bounded size."""

    scale: float
    offsets: list[tuple[int, int]]
    canvas: pymupdf.Pixmap

    @classmethod
    def plan(cls, doc: pymupdf.Document, zooms: list[float]) -> _Stitch:
        sizes = [_pixel_size(page, z) for page, z in zip(doc, zooms, strict=True)]
        width = max(max(w for w, _ in sizes), 1)
        height = max(sum(h for _, h in sizes), 1)
        scale = min(
            1.0, MAX_STITCH_HEIGHT / height, math.sqrt(MAX_STITCH_PIXELS / (width * height))
        )
        if scale < 1.0:
            sizes = [_pixel_size(page, z * scale) for page, z in zip(doc, zooms, strict=True)]
            width = max(w for w, _ in sizes)
            height = sum(h for _, h in sizes)
        offsets, y = [], 0
        for w, h in sizes:
            offsets.append(((width - w) // 2, y))
            y += h
        canvas = pymupdf.Pixmap(pymupdf.csRGB, pymupdf.IRect(0, 0, width, height), False)
        canvas.clear_with(255)
        return cls(scale=scale, offsets=offsets, canvas=canvas)

    def add(self, index: int, pix: pymupdf.Pixmap) -> None:
        x, y = self.offsets[index]
        pix.set_origin(x, y)
        # copy() clips to the canvas, so a pixel of rounding difference is harmless.
        self.canvas.copy(pix, pix.irect)


def render_pdf(
    data: bytes,
    storage: Storage,
    *,
    dpi: int = DEFAULT_DPI,
    max_pages: int = 50,
    max_bytes: int = DEFAULT_MAX_BYTES,
    stitch: bool = True,
    progress: Progress | None = None,
) -> RenderResult:
    """Render every page to PNG (and a stitched overview), or reuse a finished render.

    Raises PermanentError("pdf_invalid", reason) for empty, oversized, non-PDF,
    corrupt or password-protected input and for more than `max_pages` pages.
    """
    _check_dpi(dpi)
    progress = progress or _noop
    _check_limits(data, max_bytes, "pdf_invalid")
    paths = DerivedPaths(content_hash(data))
    params = {"dpi": dpi}
    cached = _load_cached(storage, paths, kind="pdf", params=params, stitch=stitch)
    if cached is not None:
        if cached.page_count > max_pages:
            raise PermanentError(
                "pdf_invalid", f"too many pages: {cached.page_count} > {max_pages}"
            )
        log.info("pdf %s: reusing %d rendered pages", paths.hash[:12], cached.page_count)
        progress(1.0, "reused earlier render")
        return cached

    started = time.monotonic()
    with MUPDF_LOCK, _open_pdf(data, max_bytes=max_bytes, max_pages=max_pages) as doc:
        count = doc.page_count
        zooms = [_page_zoom(page, dpi) for page in doc]
        stitcher = _Stitch.plan(doc, zooms) if stitch else None
        page_keys: list[str] = []
        texts: list[str] = []
        for index, page in enumerate(doc):
            pix = _render_page(page, zooms[index])
            key = paths.page(index + 1)
            storage.write(key, pix.tobytes("png"))
            page_keys.append(key)
            texts.append(page.get_text("text"))
            if stitcher is not None:
                small = (
                    pix
                    if stitcher.scale == 1.0
                    else _render_page(page, zooms[index] * stitcher.scale)
                )
                stitcher.add(index, small)
            del pix  # one page's pixels in memory at a time (plus the canvas)
            progress(0.95 * (index + 1) / count, f"rendered page {index + 1}/{count}")
        stitched_key = None
        if stitcher is not None:
            stitched_key = paths.stitched
            storage.write(stitched_key, stitcher.canvas.tobytes("png"))

    result = RenderResult(
        content_hash=paths.hash,
        page_count=count,
        page_keys=page_keys,
        stitched_key=stitched_key,
        text_layer=texts,
        cached=False,
        dpi=dpi,
    )
    _store_manifest(storage, paths, result, kind="pdf", params=params)
    log.info(
        "pdf %s: rendered %d pages at %d dpi in %.2fs",
        paths.hash[:12],
        count,
        dpi,
        time.monotonic() - started,
    )
    progress(1.0, "render complete")
    return result


# ---------------------------------------------------------------- photos


def prepare_image(
    data: bytes,
    storage: Storage,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_side: int = DEFAULT_MAX_SIDE,
    progress: Progress | None = None,
) -> RenderResult:
    """Store a PNG/JPEG photo as `page-001.png`, so vision sees the same shape as a PDF.

    The image is rendered through MuPDF's image document rather than loaded with a
    bare `pymupdf.Pixmap`, because only the document applies the EXIF orientation
    phones write; the result is still a Pixmap, saved as PNG. Larger images are
    scaled down to `max_side` px on their long side. The stitched key is the page
    itself (one page needs no stitching). Raises PermanentError("image_invalid", reason).
    """
    progress = progress or _noop
    _check_limits(data, max_bytes, "image_invalid")
    if data.startswith(_PNG_MAGIC):
        filetype = "png"
    elif data.startswith(_JPEG_MAGIC):
        filetype = "jpeg"
    else:
        raise PermanentError("image_invalid", "not a PNG or JPEG image")
    size = _image_size(data)
    if size is None or min(size) <= 0:
        raise PermanentError("image_invalid", "corrupt image header")
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise PermanentError(
            "image_invalid", f"image too large: {width}x{height} px > {MAX_IMAGE_PIXELS} px"
        )
    # MuPDF turns a header without pixel data into a blank page instead of failing;
    # a blank "submission" would then reach OCR and feedback. Partly truncated
    # data does fail (PNG) or shows what arrived (JPEG, like a browser would).
    if (b"IDAT" if filetype == "png" else b"\xff\xda") not in data:
        raise PermanentError("image_invalid", "no image data")

    paths = DerivedPaths(content_hash(data))
    params = {"max_side": max_side}
    cached = _load_cached(storage, paths, kind="image", params=params, stitch=True)
    if cached is not None:
        progress(1.0, "reused earlier conversion")
        return cached

    try:
        with MUPDF_LOCK, pymupdf.open(stream=data, filetype=filetype) as doc:
            page = doc[0]
            # The page is the image in points at its own resolution; map its long
            # side back to native pixels, capped at max_side.
            target = min(max(width, height), max_side)
            zoom = target / max(page.rect.width, page.rect.height)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=False)
            png = pix.tobytes("png")
    except MemoryError:
        raise
    except Exception:
        raise PermanentError("image_invalid", "corrupt or unreadable image") from None
    key = paths.page(1)
    storage.write(key, png)
    result = RenderResult(
        content_hash=paths.hash,
        page_count=1,
        page_keys=[key],
        stitched_key=key,
        text_layer=[""],
        cached=False,
    )
    _store_manifest(storage, paths, result, kind="image", params=params)
    log.info("image %s: stored %dx%d px", paths.hash[:12], pix.width, pix.height)
    progress(1.0, "image stored")
    return result


# ---------------------------------------------------------------- generic extraction


def _ocr_pages(
    storage: Storage, render: RenderResult, *, lang: str, dpi: int, progress: Progress
) -> list[str]:
    paths = DerivedPaths(render.content_hash)
    cache_key = paths.ocr(lang, dpi)
    if storage.exists(cache_key):
        try:
            texts = json.loads(storage.read(cache_key))
            if isinstance(texts, list) and len(texts) == render.page_count:
                return [str(t) for t in texts]
        except ValueError:
            pass
    texts = []
    for index, key in enumerate(render.page_keys):
        texts.append(ocr_image(storage.read(key), lang))
        progress(
            0.5 + 0.5 * (index + 1) / render.page_count, f"ocr page {index + 1}/{render.page_count}"
        )
    storage.write(cache_key, json.dumps(texts, ensure_ascii=False).encode())
    return texts


def extract_pdf(
    data: bytes,
    *,
    extraction_method: str = "text",
    include_images: bool = False,
    dpi: int = DEFAULT_DPI,
    max_pages: int = 50,
    max_bytes: int = DEFAULT_MAX_BYTES,
    ocr_lang: str = DEFAULT_LANG,
    storage: Storage | None = None,
    progress: Progress | None = None,
    **_passthrough: Any,
) -> dict[str, Any]:
    """Per-page text of a PDF as a JSON-serialisable job result.

    `extraction_method`: "text" (the PDF's own text layer), "ocr" (tesseract on the
    rendered pages) or "both" (each page's `text` is its text layer, or the OCR
    text where the layer is blank, e.g. scans). With `include_images` the rendered
    page PNGs are kept and their storage keys returned. Further payload fields
    (template, context, ...) are accepted and ignored: they belong to the caller.
    """
    if extraction_method not in EXTRACTION_METHODS:
        raise PayloadError(f"extraction_method must be one of {', '.join(EXTRACTION_METHODS)}")
    if not isinstance(include_images, bool):
        raise PayloadError("include_images must be a boolean")
    _check_dpi(dpi)
    progress = progress or _noop
    want_ocr = extraction_method in ("ocr", "both")
    if want_ocr:
        require_tesseract(ocr_lang)  # fail before rendering anything

    render: RenderResult | None = None
    if want_ocr or include_images:
        storage = storage if storage is not None else storage_from_env()
        scale = 0.5 if want_ocr else 1.0
        render = render_pdf(
            data,
            storage,
            dpi=dpi,
            max_pages=max_pages,
            max_bytes=max_bytes,
            stitch=False,
            progress=lambda f, m: progress(f * scale, m),
        )
        digest, layer = render.content_hash, render.text_layer
    else:
        with MUPDF_LOCK, _open_pdf(data, max_bytes=max_bytes, max_pages=max_pages) as doc:
            layer = [page.get_text("text") for page in doc]
        digest = content_hash(data)

    ocr = None
    if want_ocr:
        assert render is not None and storage is not None
        ocr = _ocr_pages(storage, render, lang=ocr_lang, dpi=dpi, progress=progress)

    pages: list[dict[str, Any]] = []
    for index, text_layer in enumerate(layer):
        page: dict[str, Any] = {"page": index + 1}
        if extraction_method == "text":
            page["text"] = text_layer
        elif extraction_method == "ocr":
            page["text"] = ocr[index]
        else:
            page["text"] = text_layer if text_layer.strip() else ocr[index]
            page["text_layer"] = text_layer
            page["ocr_text"] = ocr[index]
        if include_images:
            page["image_key"] = render.page_keys[index]
        pages.append(page)

    result: dict[str, Any] = {
        "content_hash": digest,
        "page_count": len(pages),
        "extraction_method": extraction_method,
        "pages": pages,
        "text": "\n\n".join(p["text"].rstrip() for p in pages),
    }
    if render is not None:
        result["dpi"] = dpi
    if include_images:
        result["image_keys"] = list(render.page_keys)
    progress(1.0, "extraction complete")
    return result
