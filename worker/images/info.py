"""Image sniffing: tells a jpeg or png from its magic bytes and reads its pixel size from the header.

Pure and stdlib-only; nothing is decoded, so a decompression bomb costs no more than its header.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass

from ..errors import InvalidImage
from ..settings import MAX_IMAGE_BYTES, MAX_REQUEST_BYTES

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_REQUEST_BYTES",
    "DECLARED_TYPES",
    "ImageInfo",
    "sniff",
    "parse_data_uri",
    "check_declared",
]

#: The media types a data URI may declare, and the kind its bytes must then be. ``image/jpg`` is not
#: among them: it is not a registered type, and a data URI is sent to the gateway as it is.
DECLARED_TYPES = {"image/jpeg": "jpeg", "image/png": "png"}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
# SOF0-SOF15 carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) sit in the same range but do not.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers with no length field after them: TEM, RST0-RST7 and SOI.
_JPEG_STANDALONE = frozenset({0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8})
_JPEG_EOI, _JPEG_SOS = 0xD9, 0xDA
# Formats people send by mistake, named in the error so the producer sees what went wrong.
_OTHER_MAGIC = (
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"%PDF-", "pdf"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


@dataclass(frozen=True)
class ImageInfo:
    """What the header says: ``kind`` is "jpeg" or "png"; ``size`` is the byte length of the data."""

    kind: str
    width: int
    height: int
    size: int


def sniff(data: bytes, *, max_pixels: int | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> ImageInfo:
    """Identify a jpeg or png by its magic bytes and read its size without decoding it.

    Raises ``InvalidImage`` with a one-line reason for any other type, a damaged header, zero
    dimensions, more than ``max_bytes`` bytes, or more than ``max_pixels`` pixels.
    """
    if len(data) > max_bytes:
        raise InvalidImage(f"size {len(data)} bytes exceeds {_byte_limit(max_bytes)}")
    kind = _kind(data)
    width, height = _png_size(data) if kind == "png" else _jpeg_size(data)
    if width == 0 or height == 0:
        raise InvalidImage(f"{kind} with a zero dimension ({width} x {height})")
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidImage(f"{width} x {height} = {width * height} pixels exceeds the limit of {max_pixels}")
    return ImageInfo(kind=kind, width=width, height=height, size=len(data))


def parse_data_uri(uri: str) -> tuple[str, bytes]:
    """Split ``data:image/...;base64,...`` into its declared media type (lower case) and decoded bytes.

    The declared type is returned, not checked against the bytes: ``sniff`` is the judge of those.
    """
    if uri[:5].lower() != "data:":
        raise InvalidImage("not a data uri")
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise InvalidImage("data uri without a comma before its payload")
    media_type, *params = (p.strip().lower() for p in header.split(";"))
    if not params or params[-1] != "base64":
        raise InvalidImage("data uri is not base64-encoded")
    if not media_type.startswith("image/"):
        raise InvalidImage(f"data uri media type {media_type[:40] or 'missing'!r} is not an image")
    try:
        # validate=True: without it, b64decode silently drops stray characters and returns garbage.
        data = base64.b64decode(payload, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII characters in the payload
        raise InvalidImage("data uri payload is not valid base64") from None
    return media_type, data


def check_declared(media_type: str, kind: str | None = None) -> None:
    """Raises InvalidImage unless a data URI's declared ``media_type`` is image/jpeg or image/png and,
    once its bytes are known (``kind``, from :func:`sniff`), names what they are."""
    declared = DECLARED_TYPES.get(media_type)
    if declared is None:
        hint = " (write image/jpeg)" if media_type == "image/jpg" else ""
        raise InvalidImage(f"data uri declares {media_type[:40]!r}{hint}; accepted: {', '.join(DECLARED_TYPES)}")
    if kind is not None and kind != declared:
        raise InvalidImage(f"data uri declares {media_type} but its bytes are a {kind}")


def _kind(data: bytes) -> str:
    if not data:
        raise InvalidImage("empty image data")
    for signature, kind in ((_PNG_SIGNATURE, "png"), (_JPEG_SOI, "jpeg")):
        if data.startswith(signature):
            return kind
        if len(data) < len(signature) and signature.startswith(data):
            raise InvalidImage(f"truncated {kind} header")
    raise InvalidImage(_not_jpeg_or_png(data))


def _not_jpeg_or_png(data: bytes) -> str:
    """What the bytes look like, never what they say: a refused file may hold PHI, and errors are shown and
    logged."""
    other = _other_format(data) or ("text" if _looks_like_text(data[:64]) else "unrecognised binary data")
    return f"not a jpeg or png (looks like {other})"


def _looks_like_text(head: bytes) -> bool:
    for cut in range(4):  # (the head may end inside a character)
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return all(c.isprintable() or c in "\t\r\n" for c in text)
    return False


def _other_format(data: bytes) -> str | None:
    for magic, kind in _OTHER_MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    # "BM" alone matches too much text; a bitmap also has four reserved zero bytes at offset 6.
    if data[:2] == b"BM" and data[6:10] == b"\x00\x00\x00\x00":
        return "bmp"
    if data[4:8] == b"ftyp":
        return "heic/avif"
    return None


def _png_size(data: bytes) -> tuple[int, int]:
    # The signature is followed by the IHDR chunk: length (13), type, width, height, ...
    if len(data) < 24:
        raise InvalidImage("truncated png header")
    if data[12:16] != b"IHDR":
        raise InvalidImage("png without an IHDR header")
    width, height = struct.unpack_from(">II", data, 16)
    if width > 2**31 - 1 or height > 2**31 - 1:
        raise InvalidImage(f"png dimensions out of range ({width} x {height})")
    return int(width), int(height)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    # Walk segment by segment, jumping over each one by its length, so bytes inside an APP segment
    # (an EXIF thumbnail has its own SOF) are never taken for a marker.
    pos = 2
    while True:
        marker, pos = _jpeg_marker(data, pos)
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI):
            raise InvalidImage("jpeg without a frame header")
        if pos + 2 > len(data):
            raise InvalidImage("truncated jpeg header")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2:
            raise InvalidImage(f"corrupt jpeg segment length at byte {pos}")
        if marker in _JPEG_SOF:
            return _jpeg_frame_size(data, pos)
        pos += length


def _jpeg_marker(data: bytes, pos: int) -> tuple[int, int]:
    """Return the marker at ``pos`` and the position just after it, skipping 0xFF fill bytes."""
    if pos >= len(data):
        raise InvalidImage("truncated jpeg header")
    if data[pos] != 0xFF:
        raise InvalidImage(f"corrupt jpeg: no marker at byte {pos}")
    while pos < len(data) and data[pos] == 0xFF:
        pos += 1
    if pos >= len(data):
        raise InvalidImage("truncated jpeg header")
    if data[pos] == 0x00:
        raise InvalidImage(f"corrupt jpeg: stuffed byte outside scan data at byte {pos}")
    return data[pos], pos + 1


def _jpeg_frame_size(data: bytes, pos: int) -> tuple[int, int]:
    # SOF segment: length (2), precision (1), height (2), width (2), ...
    if pos + 7 > len(data):
        raise InvalidImage("truncated jpeg frame header")
    height, width = struct.unpack_from(">HH", data, pos + 3)
    return int(width), int(height)


def _byte_limit(n: int) -> str:
    megabytes, rest = divmod(n, 1024 * 1024)
    return f"the {megabytes} MB limit ({n} bytes)" if megabytes and not rest else f"the limit of {n} bytes"
