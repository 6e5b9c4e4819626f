"""Messages: validation of a job's input before anything is stored. Pure; no I/O.

Accepts the OpenAI chat shape the gateway documents: roles ``system``, ``developer``, ``user``,
``assistant``; content a string or a list of ``text`` and ``image_url`` parts. Every error
names the message index and the field, e.g. ``messages[2].content[1].image_url.url: ...``.
"""

from __future__ import annotations

import re
from typing import Any

from worker.errors import InvalidImage, InvalidMessages
from worker.images.refs import Policy, check

__all__ = ["ROLES", "validate_assistant_id", "validate_messages", "image_urls"]

ROLES = ("system", "developer", "user", "assistant")
PART_TYPES = ("text", "image_url")
IMAGE_DETAILS = ("auto", "low", "high")
MAX_ASSISTANT_ID = 128
_ASSISTANT_ID = re.compile(r"^[A-Za-z0-9_.:-]+$")


def validate_assistant_id(assistant_id: object) -> str:
    """Raises InvalidMessages unless ``assistant_id`` is a short printable id."""
    if not isinstance(assistant_id, str) or not assistant_id.strip():
        raise InvalidMessages("smart_chat_assistant_id: required, a non-empty string")
    if len(assistant_id) > MAX_ASSISTANT_ID or not _ASSISTANT_ID.match(assistant_id):
        raise InvalidMessages(
            f"smart_chat_assistant_id: must be at most {MAX_ASSISTANT_ID} characters of letters, digits and _ . : -"
        )
    return assistant_id


def validate_messages(messages: object, policy: Policy | None = None) -> list[dict[str, Any]]:
    """Check ``messages`` and return it unchanged (as a list of dicts).

    Raises:
        InvalidMessages: the list, a message, a part or a field has the wrong shape.
        InvalidImage: an image reference is not allowed, or its bytes are not a complete jpeg or
            png (or a PDF, for local files) of at most 50 MB and the pixel limit.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidMessages("messages: required, a non-empty list of {role, content} objects")
    rules = policy or Policy()
    for index, message in enumerate(messages):
        _check_message(index, message, rules)
    return messages


def _check_message(index: int, message: object, policy: Policy) -> None:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise InvalidMessages(f"{where}: must be an object with role and content, got {_kind(message)}")
    extra = set(message) - {"role", "content", "name"}
    if extra:
        raise InvalidMessages(f"{where}: unknown field(s) {', '.join(sorted(extra))}; accepted: role, content, name")
    role = message.get("role")
    if role not in ROLES:
        raise InvalidMessages(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, str):
        if not content:
            raise InvalidMessages(f"{where}.content: must not be empty")
        return
    if not isinstance(content, list) or not content:
        raise InvalidMessages(f"{where}.content: must be a string or a non-empty list of parts, got {_kind(content)}")
    for part_index, part in enumerate(content):
        _check_part(f"{where}.content[{part_index}]", part, role, policy)


def _check_part(where: str, part: object, role: str, policy: Policy) -> None:
    if not isinstance(part, dict):
        raise InvalidMessages(f"{where}: must be an object, got {_kind(part)}")
    kind = part.get("type")
    if kind == "text":
        if set(part) != {"type", "text"} or not isinstance(part["text"], str) or not part["text"]:
            raise InvalidMessages(f'{where}: a text part is {{"type": "text", "text": "<non-empty string>"}}')
        return
    if kind != "image_url":
        raise InvalidMessages(f"{where}.type: {kind!r} is not one of {', '.join(PART_TYPES)}")
    if role != "user":
        raise InvalidMessages(f"{where}: image parts are accepted in user messages only, not {role}")
    image = part.get("image_url")
    if set(part) != {"type", "image_url"} or not isinstance(image, dict):
        raise InvalidMessages(f'{where}: an image part is {{"type": "image_url", "image_url": {{"url": "..."}}}}')
    _check_image(f"{where}.image_url", image, policy)


def _check_image(where: str, image: dict[str, Any], policy: Policy) -> None:
    extra = set(image) - {"url", "detail"}
    if extra:
        raise InvalidMessages(f"{where}: unknown field(s) {', '.join(sorted(extra))}; accepted: url, detail")
    if "detail" in image and image["detail"] not in IMAGE_DETAILS:
        raise InvalidMessages(f"{where}.detail: {image['detail']!r} is not one of {', '.join(IMAGE_DETAILS)}")
    url = image.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidMessages(f"{where}.url: required, a non-empty string")
    try:
        check(url, policy)
    except InvalidImage as exc:
        raise InvalidImage(f"{where}.url: {exc}") from None


def image_urls(messages: list[dict[str, Any]]) -> list[str]:
    """Every image URL of validated messages, in order."""
    return [
        part["image_url"]["url"]
        for message in messages
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__
