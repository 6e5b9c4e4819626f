"""Test images: the product's own samples (real png and jpeg files of any size) and data URIs."""

from __future__ import annotations

from qbgw.images.samples import PNG_SIGNATURE, data_uri, jpeg_bytes, jpeg_segment, png_bytes, png_header

__all__ = ["PNG_SIGNATURE", "data_uri", "jpeg_bytes", "jpeg_segment", "pdf_bytes", "png_bytes", "png_header"]


def pdf_bytes(*pages: tuple[float, float]) -> bytes:
    """A real PDF with blank pages of the given sizes in points (1/72 inch), made by pdfium."""
    import io

    import pypdfium2 as pdfium

    document = pdfium.PdfDocument.new()
    try:
        for width, height in pages:
            document.new_page(width, height).close()
        out = io.BytesIO()
        document.save(out)
        return out.getvalue()
    finally:
        document.close()
