"""Samples: real png and baseline jpeg files of any size, built in memory, and data URIs.

Used by ``qbgw demo`` and the tests. Both are real files (checked with Pillow/libjpeg: they decode
to flat black and mid-grey), so a test that passes with them does not lean on a sniffer's leniency.
"""

from __future__ import annotations

import base64
import struct
import zlib

__all__ = ["png_bytes", "png_rgb", "png_header", "jpeg_bytes", "jpeg_segment", "data_uri"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(width: int, height: int) -> bytes:
    """A black 8-bit greyscale png of width x height pixels."""
    row = b"\x00" + bytes(width)  # filter type 0, then one byte per pixel
    return png_header(width, height, idat=zlib.compress(row * height))


def png_rgb(width: int, height: int, pixels: bytes, stride: int) -> bytes:
    """An 8-bit RGB png from raw rows of ``stride`` bytes (3 bytes a pixel, then padding)."""
    rows = b"".join(b"\x00" + pixels[y * stride : y * stride + 3 * width] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(rows, 6))
    return PNG_SIGNATURE + chunks + _png_chunk(b"IEND", b"")


def png_header(width: int, height: int, *, idat: bytes = b"") -> bytes:
    """A png whose IHDR claims width x height; without ``idat`` it has no pixel data at all.

    For dimension checks on sizes that must never be allocated (a 100000 x 100000 "bomb").
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunks = _png_chunk(b"IHDR", ihdr)
    if idat:
        chunks += _png_chunk(b"IDAT", idat)
    return PNG_SIGNATURE + chunks + _png_chunk(b"IEND", b"")


def jpeg_bytes(width: int, height: int) -> bytes:
    """A mid-grey baseline greyscale jpeg: SOI, APP0 JFIF, DQT, SOF0, DHT x2, SOS, scan data, EOI.

    Each Huffman table has a single one-bit code (DC difference 0, AC end-of-block), so every 8x8
    block encodes in two zero bits and the scan is cheap to write for any size.
    """
    jfif = b"JFIF\x00" + bytes([1, 1, 0]) + struct.pack(">HH", 1, 1) + b"\x00\x00"
    dqt = b"\x00" + bytes([1] * 64)
    sof0 = struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])
    dht_dc = b"\x00" + bytes([1] + [0] * 15) + b"\x00"
    dht_ac = b"\x10" + bytes([1] + [0] * 15) + b"\x00"
    sos = bytes([1, 1, 0x00, 0, 63, 0])
    blocks = -(-width // 8) * -(-height // 8)
    bits = 2 * blocks
    # Zero bits, the last byte padded with one bits as the standard asks; no 0xFF byte can occur.
    scan = bytes(bits // 8) + (bytes([0xFF >> (bits % 8)]) if bits % 8 else b"")
    segments = [
        jpeg_segment(0xE0, jfif),
        jpeg_segment(0xDB, dqt),
        jpeg_segment(0xC0, sof0),
        jpeg_segment(0xC4, dht_dc),
        jpeg_segment(0xC4, dht_ac),
        jpeg_segment(0xDA, sos),
    ]
    return b"\xff\xd8" + b"".join(segments) + scan + b"\xff\xd9"


def jpeg_segment(marker: int, payload: bytes) -> bytes:
    """One marker segment (marker, 2-byte length, payload), for tests that splice headers."""
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def data_uri(kind: str, data: bytes) -> str:
    """``data:image/<kind>;base64,...`` for the given bytes (kind is not checked against them)."""
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)
