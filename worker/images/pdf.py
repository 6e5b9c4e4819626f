"""Documents: a PDF rendered to PNG pages (pypdfium2), so a scanned document can be analysed
like an image. Runs in the worker; the page count and resolution are limited by settings.
"""

from __future__ import annotations

import pypdfium2 as pdfium

from ..errors import ResolutionFailed
from .samples import png_rgb

__all__ = ["render_pages"]


def render_pages(data: bytes, *, max_pages: int, dpi: float) -> list[bytes]:
    """PNG bytes of the first ``max_pages`` pages at ``dpi``.

    Raises:
        ResolutionFailed: the PDF cannot be opened (damaged, encrypted) or has no page.
    """
    try:
        document = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        raise ResolutionFailed(f"the PDF cannot be opened: {exc}") from None
    try:
        if len(document) == 0:
            raise ResolutionFailed("the PDF has no pages")
        return [_render(document[i], dpi) for i in range(min(len(document), max_pages))]
    finally:
        document.close()


def _render(page: pdfium.PdfPage, dpi: float) -> bytes:
    try:
        bitmap = page.render(scale=dpi / 72, rev_byteorder=True)  # RGB, as png wants it
        try:
            return png_rgb(bitmap.width, bitmap.height, bytes(bitmap.buffer), bitmap.stride)
        finally:
            bitmap.close()
    finally:
        page.close()
