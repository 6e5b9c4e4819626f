"""Unit tests of worker.imageinfo: type by magic bytes, size from the header, data URIs."""

from __future__ import annotations

import base64
import struct

import pytest

from qbgw.errors import InputError, InvalidImage
from qbgw.images.info import ImageInfo, parse_data_uri, sniff
from qbgw.settings import MAX_IMAGE_BYTES
from tests.images import data_uri, jpeg_bytes, jpeg_segment, png_bytes, png_header


def _sof0(width: int, height: int) -> bytes:
    return jpeg_segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0]))


def _without_sof(jpeg: bytes) -> bytes:
    start = jpeg.index(b"\xff\xc0")
    return jpeg[:start] + jpeg[start + 2 + 11 :]


def test_png_kind_and_size_come_from_the_ihdr() -> None:
    data = png_bytes(64, 48)
    assert sniff(data) == ImageInfo(kind="png", width=64, height=48, size=len(data))


def test_jpeg_kind_and_size_come_from_the_sof0_frame_header() -> None:
    data = jpeg_bytes(37, 21)
    assert sniff(data) == ImageInfo(kind="jpeg", width=37, height=21, size=len(data))


def test_jpeg_progressive_sof2_is_read_too() -> None:
    data = jpeg_bytes(300, 200).replace(b"\xff\xc0", b"\xff\xc2", 1)
    assert (sniff(data).width, sniff(data).height) == (300, 200)


def test_jpeg_fill_bytes_and_standalone_markers_are_skipped() -> None:
    data = jpeg_bytes(10, 20)
    data = b"\xff\xd8" + b"\xff\x01" + b"\xff\xd0" + data[2:]  # TEM and RST0 have no length field
    data = data.replace(b"\xff\xc0", b"\xff\xff\xff\xc0", 1)  # 0xFF fill before a marker
    assert (sniff(data).width, sniff(data).height) == (10, 20)


def test_jpeg_frame_header_inside_an_app_segment_is_not_taken_for_the_real_one() -> None:
    fake = b"Exif\x00\x00" + _sof0(1, 1)  # an EXIF thumbnail carries its own SOF bytes
    data = jpeg_bytes(640, 480)
    data = data[:2] + jpeg_segment(0xE1, fake) + data[2:]
    assert (sniff(data).width, sniff(data).height) == (640, 480)


def test_gif_renamed_as_jpeg_is_rejected_naming_gif() -> None:
    gif = b"GIF89a" + struct.pack("<HH", 1, 1) + b"\x80\x00\x00" + bytes(10)
    with pytest.raises(InvalidImage, match=r"^not a jpeg or png \(looks like gif\)$"):
        sniff(gif)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00", "bmp"),
        (b"%PDF-1.7\n%\xe2\xe3", "pdf"),
    ],
)
def test_other_recognisable_formats_are_named(data: bytes, kind: str) -> None:
    with pytest.raises(InvalidImage, match=f"looks like {kind}"):
        sniff(data)


@pytest.mark.parametrize(
    ("data", "looks"),
    [
        (b"JohnDoe MRN 0042 visit note", "text"),
        ("Zo\u00eb \u2014 \u043a\u043b\u0438\u043d\u0438\u043a\u0430 \u2603 " * 5, "text"),
        (b"\x00\x01\x02\x03\xff\xfe", "unrecognised binary data"),
    ],
)
def test_unrecognisable_bytes_are_described_never_quoted(data: bytes | str, looks: str) -> None:
    """A refused file may hold PHI: the error says what it looks like, not what it says."""
    raw = data.encode() if isinstance(data, str) else data
    with pytest.raises(InvalidImage, match=rf"^not a jpeg or png \(looks like {looks}\)$"):  # (nothing more)
        sniff(raw)


def test_invalid_image_is_an_input_error() -> None:
    with pytest.raises(InputError):
        sniff(b"")


def test_truncated_png_header_is_rejected() -> None:
    with pytest.raises(InvalidImage, match=r"^truncated png header$"):
        sniff(png_bytes(8, 8)[:20])


def test_a_png_signature_cut_short_is_a_truncated_png_not_an_unknown_type() -> None:
    with pytest.raises(InvalidImage, match=r"^truncated png header$"):
        sniff(b"\x89PN")


def test_jpeg_without_a_frame_header_is_rejected() -> None:
    # Without SOF the walk meets the two DHT segments (0xC4, in the SOF range but no frame) and then SOS.
    with pytest.raises(InvalidImage, match=r"^jpeg without a frame header$"):
        sniff(_without_sof(jpeg_bytes(16, 16)))


def test_jpeg_cut_before_its_frame_header_is_truncated() -> None:
    data = jpeg_bytes(16, 16)
    with pytest.raises(InvalidImage, match=r"^truncated jpeg header$"):
        sniff(data[: data.index(b"\xff\xc0") + 3])


def test_jpeg_with_garbage_where_a_marker_should_be_is_rejected() -> None:
    data = jpeg_bytes(4, 4)
    after_app0 = 2 + 2 + 16
    with pytest.raises(InvalidImage, match=r"^corrupt jpeg: no marker at byte 20$"):
        sniff(data[:after_app0] + b"\x12\x34" + data[after_app0:])


def test_zero_dimensions_are_rejected() -> None:
    with pytest.raises(InvalidImage, match=r"^png with a zero dimension \(0 x 5\)$"):
        sniff(png_header(0, 5))
    with pytest.raises(InvalidImage, match=r"^jpeg with a zero dimension \(7 x 0\)$"):
        sniff(jpeg_bytes(7, 0))


def test_data_over_the_50_mb_limit_is_rejected_before_anything_else() -> None:
    with pytest.raises(InvalidImage, match=r"^size 52428801 bytes exceeds the 50 MB limit \(52428800 bytes\)$"):
        sniff(bytes(MAX_IMAGE_BYTES + 1))


def test_data_of_exactly_50_mb_passes_the_size_check() -> None:
    png = png_bytes(2, 2)
    info = sniff(png + bytes(MAX_IMAGE_BYTES - len(png)))
    assert info.size == MAX_IMAGE_BYTES


def test_the_byte_limit_can_be_lowered() -> None:
    data = png_bytes(64, 64)
    with pytest.raises(InvalidImage, match=rf"^size {len(data)} bytes exceeds the limit of 50 bytes$"):
        sniff(data, max_bytes=50)


def test_a_header_claiming_a_pixel_bomb_is_rejected_without_decoding() -> None:
    bomb = png_header(100_000, 100_000)
    with pytest.raises(InvalidImage, match=r"^100000 x 100000 = 10000000000 pixels exceeds the limit of 178956970$"):
        sniff(bomb, max_pixels=178_956_970)


def test_without_max_pixels_a_large_header_is_only_reported() -> None:
    assert sniff(png_header(100_000, 100_000)).width == 100_000


def test_data_uri_gives_the_declared_type_and_the_decoded_bytes() -> None:
    png = png_bytes(3, 2)
    assert parse_data_uri(data_uri("png", png)) == ("image/png", png)


def test_data_uri_media_type_and_parameters_are_case_insensitive() -> None:
    jpeg = jpeg_bytes(3, 2)
    uri = "DATA:Image/JPEG;charset=binary;BASE64," + base64.b64encode(jpeg).decode()
    assert parse_data_uri(uri) == ("image/jpeg", jpeg)


def test_data_uri_with_invalid_base64_is_rejected() -> None:
    with pytest.raises(InvalidImage, match=r"^data uri payload is not valid base64$"):
        parse_data_uri("data:image/png;base64,iVBOR*w0KGgo=")


def test_data_uri_with_non_ascii_payload_is_rejected_as_invalid_base64() -> None:
    with pytest.raises(InvalidImage, match="not valid base64"):
        parse_data_uri("data:image/png;base64,iVBORé")


def test_data_uri_that_is_not_base64_encoded_is_rejected() -> None:
    with pytest.raises(InvalidImage, match=r"^data uri is not base64-encoded$"):
        parse_data_uri("data:image/png,%89PNG")


def test_data_uri_with_a_non_image_media_type_is_rejected() -> None:
    with pytest.raises(InvalidImage, match=r"^data uri media type 'text/plain' is not an image$"):
        parse_data_uri("data:text/plain;base64,aGVsbG8=")


@pytest.mark.parametrize("uri", ["https://example.com/a.png", "data:image/png;base64"])
def test_strings_that_are_not_data_uris_are_rejected(uri: str) -> None:
    with pytest.raises(InvalidImage):
        parse_data_uri(uri)
