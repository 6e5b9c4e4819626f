"""Resolution: a request's image references turned, in the worker, into what the gateway accepts
(``build_body``): inline data URIs as they are, https URLs as URLs (or fetched, ``remote``), local
images streamed as base64 (``body``), PDFs rendered to PNG pages (``pdf``).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from ..errors import InvalidImage, ResolutionFailed
from ..settings import Settings
from ..upstream.gateway import encode_request
from . import refs
from .body import FileImage, Segment, StreamingBody, replaced
from .info import sniff
from .pdf import render_pages
from .remote import Limits, fetch

__all__ = ["policy", "needs_resolution", "build_body", "StreamingBody"]


def policy(settings: Settings) -> refs.Policy:
    """What a request may carry under ``settings``: the one policy of the Python API, the CLI and batches."""
    return refs.Policy(
        roots=settings.image_root_paths,
        max_pixels=settings.max_image_pixels,
        max_request_bytes=settings.max_request_bytes,
    )


def needs_resolution(messages: list[dict[str, Any]], settings: Settings) -> bool:
    """True if some reference must be turned into bytes before the call."""
    fetch = settings.fetch_remote_images
    return any(
        refs.kind_of(u) == refs.Kind.LOCAL or (fetch and u.startswith("https://")) for u in refs.image_urls(messages)
    )


def build_body(
    assistant_id: str,
    messages: list[dict[str, Any]],
    settings: Settings,
    files: dict[str, list[int]] | None = None,
) -> bytes | StreamingBody:
    """The request body with every reference resolved. ``files``: the fingerprint of each local file as it was
    at submit (``refs.fingerprints``); a file whose fingerprint differs now is refused, not sent.

    Raises:
        ResolutionFailed: a file vanished, changed or left its root, or is not the file submitted; a fetch was
            refused; a PDF cannot be rendered.
    """
    if not needs_resolution(messages, settings):
        return encode_request(assistant_id, messages)
    inline: list[list[Segment]] = []
    resolved = [_resolve_message(m, settings, inline, files or {}) for m in messages]
    text = encode_request(assistant_id, resolved).decode()
    segments: list[Segment] = []
    for n, pieces in enumerate(inline):
        before, text = text.split(json.dumps(_marker(n)), 1)
        segments += [before.encode(), b'"', *pieces, b'"']
    segments.append(text.encode())
    return StreamingBody(segments)


def _marker(n: int) -> str:
    return f"\x00qbgw-image-{n}\x00"


def _resolve_message(
    message: dict[str, Any], settings: Settings, inline: list[list[Segment]], files: dict[str, list[int]]
) -> dict[str, Any]:
    if not isinstance(message["content"], list):
        return message
    parts: list[dict[str, Any]] = []
    for part in message["content"]:
        if part["type"] != "image_url":
            parts.append(part)
            continue
        for pieces in _resolve_url(part["image_url"]["url"], settings, files):
            if isinstance(pieces, str):
                parts.append({"type": "image_url", "image_url": {**part["image_url"], "url": pieces}})
            else:
                inline.append(pieces)
                parts.append({"type": "image_url", "image_url": {**part["image_url"], "url": _marker(len(inline) - 1)}})
    return {**message, "content": parts}


def _resolve_url(url: str, settings: Settings, files: dict[str, list[int]]) -> list[str | list[Segment]]:
    kind = refs.kind_of(url)
    if kind == refs.Kind.DATA or (kind == refs.Kind.HTTPS and not settings.fetch_remote_images):
        return [url]
    if kind == refs.Kind.HTTPS:
        data = fetch(url, Limits(settings.fetch_max_bytes, settings.fetch_timeout))
        return [[_inline(data, settings)]]
    return _resolve_local(url, settings, files.get(url))


def _inline(data: bytes, settings: Settings) -> bytes:
    try:
        info = sniff(data, max_pixels=settings.max_image_pixels)
        refs.check_complete(info.kind, data[-refs.TAIL_BYTES :])
    except InvalidImage as exc:
        raise ResolutionFailed(f"the fetched image is not usable: {exc}") from None
    return f"data:image/{info.kind};base64,".encode() + base64.b64encode(data)


def _resolve_local(url: str, settings: Settings, submitted: list[int] | None) -> list[str | list[Segment]]:
    try:
        found = refs.inspect_local(url, policy(settings))  # again: the file may have changed since submit
    except InvalidImage as exc:
        raise ResolutionFailed(f"image reference {url}: {exc}") from None
    stamp = None if submitted is None else (submitted[0], submitted[1])
    if stamp is not None and found.stamp != stamp:
        raise ResolutionFailed(f"image reference {url}: {replaced(found.path, stamp, found.stamp)}")
    if found.kind != "pdf":
        return [[FileImage(found.path, found.kind, found.size, stamp)]]
    try:
        with found.path.open("rb") as handle:
            now = refs.fingerprint(os.fstat(handle.fileno()))
            data = handle.read()
    except OSError as exc:
        raise ResolutionFailed(f"image reference {url}: {exc.strerror}") from None
    if stamp is not None and now != stamp:
        raise ResolutionFailed(f"image reference {url}: {replaced(found.path, stamp, now)}")
    pages = render_pages(data, max_pages=settings.pdf_max_pages, dpi=settings.pdf_dpi)
    return [[b"data:image/png;base64," + base64.b64encode(page)] for page in pages]
