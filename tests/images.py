"""Test images: the product's own samples (real png and jpeg files of any size) and data URIs."""

from __future__ import annotations

from worker.samples import PNG_SIGNATURE, data_uri, jpeg_bytes, jpeg_segment, png_bytes, png_header

__all__ = ["PNG_SIGNATURE", "data_uri", "jpeg_bytes", "jpeg_segment", "png_bytes", "png_header"]
