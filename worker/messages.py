"""Messages: validation of a job's input before anything is stored. Pure; no I/O.

Accepts the OpenAI chat shape the gateway documents: roles ``system``, ``developer``, ``user``,
``assistant``; content a string or a list of ``text`` and ``image_url`` parts; an optional ``name``.
Every error names the field, e.g. ``messages[2].content[1].image_url.url: ...``, and never echoes a
person's text. The cheap checks run first: the shape, then the size (before anything is copied),
then that every string can be encoded as UTF-8, and only then the images (which decode data URIs).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Collection, Iterable
from typing import Any

from .errors import InvalidImage, InvalidMessages
from .images.refs import Policy, check, https_target

__all__ = [
    "ROLES",
    "REQUEST_FIELDS",
    "MAX_KEY",
    "check_fields",
    "load_json",
    "validate_assistant_id",
    "validate_key",
    "validate_messages",
    "has_lone_surrogate",
    "unique_keys",
    "DuplicateKey",
    "validate_subject",
    "MAX_SUBJECT",
    "CHAT_SUPPORTED",
    "CHAT_DEFAULTS",
    "chat_request",
]

ROLES = ("system", "developer", "user", "assistant")
PART_TYPES = ("text", "image_url")
IMAGE_DETAILS = ("auto", "low", "high")
MESSAGE_FIELDS = ("role", "content", "name")
#: The fields of one request (``qbgw submit FILE``); a batch line has its own, see ``batch_input``.
REQUEST_FIELDS = ("smart_chat_assistant_id", "messages", "custom_id", "idempotency_key", "subject")
MAX_ASSISTANT_ID = 128
MAX_KEY = 255
# Always fullmatch: with match() and "$", a final "\n" would pass.
_ASSISTANT_ID = re.compile(r"[A-Za-z0-9_.:-]+")
#: OpenAI's rule for a participant's name.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A str may hold a lone surrogate (a JSON "\ud800" escape, a file name that is not UTF-8); UTF-8 cannot
# encode one, so the request encoder would fail on every attempt. A search copies nothing.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_PLAIN = re.compile(r"[A-Za-z0-9_.-]{1,40}")
# The type a request's field must have when it is given (null counts as not given).
_FIELD_TYPES: dict[str, tuple[type, str]] = {
    "smart_chat_assistant_id": (str, "a string"),
    "custom_id": (str, "a string"),
    "subject": (str, "a string"),
    "idempotency_key": (str, "a string"),
    "messages": (list, "a list"),
    "method": (str, "a string"),
    "url": (str, "a string"),
    "body": (dict, "an object"),
}
_UTF8_CHUNK = 1 << 20
#: The fields of an OpenAI chat completion request the gateway honours: ``model`` (the Smart Chat assistant's id)
#: and ``messages``.
CHAT_SUPPORTED = ("model", "messages")
#: Fields accepted only with the value that changes nothing (the gateway gives one answer, not streamed).
CHAT_DEFAULTS: dict[str, object] = {"n": 1, "stream": False}


def check_fields(data: dict[Any, Any], accepted: Collection[str], where: str = "") -> dict[Any, Any]:
    """Refuse a field outside ``accepted`` and a known field of the wrong type; returns ``data``.

    The one rule for a request's own fields, for ``qbgw submit FILE`` and batch lines alike.

    Raises:
        InvalidMessages: naming the unknown fields and listing the accepted ones, or naming the field
            whose value has the wrong type.
    """
    _refuse_unknown(where, data, accepted)
    for key, value in data.items():
        kind, label = _FIELD_TYPES.get(key, (object, ""))
        if value is not None and not isinstance(value, kind):
            raise InvalidMessages(f"{where + '.' if where else ''}{key}: must be {label}, got {_kind(value)}")
    return data


class DuplicateKey(ValueError):
    """A JSON object names a key twice (JSON allows it; which one counts is each parser's guess)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the key {key[:64]!r} appears twice in one object; give each key once")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads``'s ``object_pairs_hook``: an object as a dict, or DuplicateKey. Taking the last value, as
    ``json`` does, read a request otherwise than a proxy or a log that took the first."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))  # type: ignore[func-returns-value]
    return data


def load_json(text: str, *, one_line: bool = False) -> Any:
    """Parse a person's JSON. Raises InvalidMessages ("not valid JSON: ...") with the position of a
    syntax error, and for nesting too deep for the parser, a number too long to read or a key given twice in
    one object."""
    try:  # a byte order mark, as some editors write, is not JSON's
        return json.loads(text.removeprefix("\ufeff"), object_pairs_hook=unique_keys)
    except DuplicateKey as exc:
        raise InvalidMessages(f"not valid JSON for a request: {exc}") from None
    except json.JSONDecodeError as exc:
        where = f"column {exc.colno}" if one_line else f"line {exc.lineno} column {exc.colno}"
        raise InvalidMessages(f"not valid JSON: {exc.msg} at {where}") from None
    except RecursionError:
        raise InvalidMessages("not valid JSON for a request: nested too deeply to parse") from None
    except ValueError:  # an integer of more than 4,300 digits
        raise InvalidMessages("not valid JSON for a request: a number too long to read") from None


def validate_assistant_id(assistant_id: object, field: str = "smart_chat_assistant_id") -> str:
    """Raises InvalidMessages (naming ``field``, the caller's name for it) unless ``assistant_id`` is a short
    printable id."""
    if not isinstance(assistant_id, str) or not assistant_id.strip():
        raise InvalidMessages(f"{field}: required, a non-empty string")
    _check_encodable(field, assistant_id)
    if len(assistant_id) > MAX_ASSISTANT_ID or not _ASSISTANT_ID.fullmatch(assistant_id):
        raise InvalidMessages(f"{field}: must be at most {MAX_ASSISTANT_ID} characters of letters, digits and _ . : -")
    return assistant_id


#: The longest webhook URL accepted.
MAX_WEBHOOK_URL = 2048


def validate_webhook_url(value: object, *, development: bool = False, name: str = "webhook_url") -> str:
    """Raises InvalidMessages unless ``value`` is an https:// URL with a host (http:// too with ``development``),
    at most MAX_WEBHOOK_URL characters, without user info. Where it points is checked when it is called (the
    same guard as image fetching: no private, loopback or link-local address outside development)."""
    from urllib.parse import urlsplit

    if not isinstance(value, str) or not value or len(value) > MAX_WEBHOOK_URL:
        raise InvalidMessages(f"{name}: must be a URL of at most {MAX_WEBHOOK_URL} characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise InvalidMessages(f"{name}: not a URL ({exc})") from None
    schemes = ("https", "http") if development else ("https",)
    if parts.scheme not in schemes:
        accepted = (
            "https:// (http:// only with QBGW_WEBHOOKS_DEVELOPMENT)" if not development else "https:// or http://"
        )
        raise InvalidMessages(f"{name}: must be {accepted}, got {parts.scheme or 'no scheme'}")
    if not parts.hostname:
        raise InvalidMessages(f"{name}: has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidMessages(f"{name}: must not carry a user name or password; sign with the webhook secret instead")
    if port == 0:
        raise InvalidMessages(f"{name}: port 0 is not a port")
    _check_encodable(name, value)
    invisible = not value.isascii() and any(unicodedata.category(c) in _INVISIBLE for c in value)
    if _CONTROL.search(value) or " " in value or invisible:
        raise InvalidMessages(f"{name}: must not hold spaces, control or invisible characters (percent-encode them)")
    try:  # the host as it is called: a name, an IPv4 or a bracketed IPv6 address (image URLs' rule)
        https_target("https://" + value.split("://", 1)[1])
    except InvalidImage as exc:
        raise InvalidMessages(f"{name}: {str(exc).replace('an https URL', 'the URL')}") from None
    return value


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Unicode's format characters (a zero-width space), other spaces and separators: unseen in a URL as shown.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def validate_key(name: str, value: object, *, most: int = MAX_KEY, controls: re.Pattern[str] = _CONTROL) -> str:
    """Raises InvalidMessages unless ``value`` (a ``custom_id`` or ``idempotency_key``; an actor) is a non-empty
    string of at most ``most`` characters, none of ``controls``, all encodable as UTF-8."""
    if not isinstance(value, str) or not value.strip() or len(value) > most:
        raise InvalidMessages(f"{name}: must be a non-empty string of at most {most} characters")
    control = controls.search(value)
    if control is not None:  # PostgreSQL text cannot hold NUL, and no one means a control character in an id
        raise InvalidMessages(
            f"{name}: must not contain control characters; found U+{ord(control[0]):04X} at index {control.start()}"
        )
    _check_encodable(name, value)
    return value


#: The longest actor (the audit events' ``actor`` column).
MAX_ACTOR = 128


def resolve_actor(given: object, configured: str, default: str, name: str = "actor") -> str:
    """Who an audit event names: ``given`` (a caller's ``actor=`` or ``reader=``), else ``configured``
    (``QBGW_ACTOR``), else ``default``. Raises InvalidMessages, naming ``name``, unless ``given`` is None, empty,
    or a string of at most MAX_ACTOR characters without control characters, encodable as UTF-8: an actor that
    is not text would be stored as text, and the event's hash (of the value given) would no longer match it."""
    if given is None or given == "":
        return configured or default
    if not isinstance(given, str):
        raise InvalidMessages(
            f"{name}: must be a string (who is acting, e.g. 'billing-app'), got {type(given).__name__}"
        )
    return validate_key(name, given, most=MAX_ACTOR, controls=_ANY_CONTROL)


#: Unicode's control characters (category Cc: C0, DEL and C1).
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: The longest subject accepted (characters, after normalisation).
MAX_SUBJECT = 255


def validate_subject(value: object, name: str = "subject") -> str:
    """The normalised subject (a patient's record number, or any reference the customer uses to say whom a job is
    about): ``value`` with leading and trailing whitespace removed (``str.strip()``: spaces, tabs, line breaks and
    other Unicode whitespace), nothing else changed (case and inner spaces are kept). The error never echoes it.

    Raises:
        InvalidMessages: ``value`` is not a string, is empty once stripped, is over MAX_SUBJECT characters, holds a
            control character, or cannot be encoded as UTF-8.
    """
    accepted = f"a non-empty string of at most {MAX_SUBJECT} characters, without control characters"
    if not isinstance(value, str):
        raise InvalidMessages(f"{name}: must be {accepted}, got {_kind(value)}")
    subject = value.strip()
    if not subject:
        raise InvalidMessages(f"{name}: must be {accepted}; got an empty one")
    if len(subject) > MAX_SUBJECT:
        raise InvalidMessages(f"{name}: must be {accepted}; got {len(subject)} characters")
    control = _ANY_CONTROL.search(subject)
    if control is not None:
        raise InvalidMessages(f"{name}: must be {accepted}; found U+{ord(control[0]):04X} at index {control.start()}")
    _check_encodable(name, subject)
    return subject


def validate_messages(
    messages: object, policy: Policy | None = None, *, field: str = "messages"
) -> list[dict[str, Any]]:
    """Check ``messages`` and return it unchanged (as a list of dicts). ``field``: its name in errors, as the
    caller's input names it (``body.messages`` in an OpenAI batch line).

    Raises:
        InvalidMessages: the list, a message, a part or a field has the wrong shape; a string holds a
            lone surrogate (not encodable as UTF-8); the text is over ``policy.max_request_bytes``.
        InvalidImage: an image reference is not allowed, or its bytes are not a complete jpeg or
            png (or a PDF, for local files) of at most 50 MB and the pixel limit.
    """
    if not isinstance(messages, list) or not messages:
        raise InvalidMessages(f"{field}: required, a non-empty list of {{role, content}} objects")
    rules = policy or Policy()
    found = _Found()
    for index, message in enumerate(messages):
        _check_message(f"{field}[{index}]", message, found)
    _check_texts(found.texts, rules.max_request_bytes, field)
    for where, url in found.images:
        try:
            check(url, rules)
        except InvalidImage as exc:
            raise InvalidImage(f"{where}: {exc}") from None
    return messages


class _Found:
    """What the shape check collects (references, not copies): every string of the request with its
    field, and the image URLs among them."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []
        self.images: list[tuple[str, str]] = []


def _check_message(where: str, message: object, found: _Found) -> None:
    if not isinstance(message, dict):
        raise InvalidMessages(f"{where}: must be an object with role and content, got {_kind(message)}")
    _refuse_unknown(where, message, MESSAGE_FIELDS)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidMessages(f"{where}.role: {_show(role)} is not one of {', '.join(ROLES)}")
    if "name" in message:
        name = message["name"]
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidMessages(f"{where}.name: must be 1 to 64 letters, digits, _ or - (OpenAI's participant name)")
        found.texts.append((f"{where}.name", name))
    content = message.get("content")
    if isinstance(content, str):
        if not content:
            raise InvalidMessages(f"{where}.content: must not be empty")
        found.texts.append((f"{where}.content", content))
        return
    if not isinstance(content, list) or not content:
        raise InvalidMessages(f"{where}.content: must be a string or a non-empty list of parts, got {_kind(content)}")
    for part_index, part in enumerate(content):
        _check_part(f"{where}.content[{part_index}]", part, role, found)


def _check_part(where: str, part: object, role: str, found: _Found) -> None:
    if not isinstance(part, dict):
        raise InvalidMessages(f"{where}: must be an object, got {_kind(part)}")
    kind = part.get("type")
    if kind == "text":
        if set(part) != {"type", "text"} or not isinstance(part["text"], str) or not part["text"]:
            raise InvalidMessages(f'{where}: a text part is {{"type": "text", "text": "<non-empty string>"}}')
        found.texts.append((f"{where}.text", part["text"]))
        return
    if kind != "image_url":
        raise InvalidMessages(f"{where}.type: {_show(kind)} is not one of {', '.join(PART_TYPES)}")
    if role != "user":
        raise InvalidMessages(f"{where}: image parts are accepted in user messages only, not {role}")
    image = part.get("image_url")
    if set(part) != {"type", "image_url"} or not isinstance(image, dict):
        raise InvalidMessages(f'{where}: an image part is {{"type": "image_url", "image_url": {{"url": "..."}}}}')
    where += ".image_url"
    _refuse_unknown(where, image, ("url", "detail"))
    if "detail" in image and image["detail"] not in IMAGE_DETAILS:
        raise InvalidMessages(f"{where}.detail: {_show(image['detail'])} is not one of {', '.join(IMAGE_DETAILS)}")
    url = image.get("url")
    if not isinstance(url, str) or not url:
        raise InvalidMessages(f"{where}.url: required, a non-empty string")
    found.texts.append((f"{where}.url", url))
    found.images.append((f"{where}.url", url))


def _check_texts(texts: list[tuple[str, str]], limit: int, field: str = "messages") -> None:
    """The request's size (characters first: free; then UTF-8 bytes, only if they could differ), and that
    every string is encodable. Raises InvalidMessages."""
    chars = sum(len(text) for _, text in texts)
    if chars > limit:
        exact = all(text.isascii() for _, text in texts)
        raise _too_large(f"{chars}" if exact else f"at least {chars}", limit, field)
    size = 0
    for where, text in texts:
        _check_encodable(where, text)
        size += _utf8_length(text)
    if size > limit:
        raise _too_large(str(size), limit, field)


def _too_large(size: str, limit: int, field: str) -> InvalidMessages:
    return InvalidMessages(
        f"{field}: {size} bytes of text (data URIs included) is over the request limit of {limit} bytes "
        "(QBGW_MAX_REQUEST_BYTES)"
    )


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone UTF-16 surrogate: a str, but no Unicode text (UTF-8 cannot encode it)."""
    return _SURROGATE.search(text) is not None


def _check_encodable(where: str, text: str) -> None:
    found = _SURROGATE.search(text)
    if found is not None:
        raise InvalidMessages(
            f"{where}: not encodable as UTF-8: a lone surrogate (U+{ord(found[0]):04X}) at index {found.start()}; "
            "text must be valid Unicode (a file name that is not UTF-8 reads this way)"
        )


def _utf8_length(text: str) -> int:
    if text.isascii():  # O(1) in CPython
        return len(text)
    return sum(len(text[i : i + _UTF8_CHUNK].encode()) for i in range(0, len(text), _UTF8_CHUNK))


def _refuse_unknown(where: str, data: dict[Any, Any], accepted: Collection[str]) -> None:
    extra = [key for key in data if key not in accepted]
    if extra:
        prefix = f"{where}: " if where else ""
        raise InvalidMessages(f"{prefix}unknown field(s) {_names(extra)}; accepted: {', '.join(sorted(accepted))}")


def _names(keys: Iterable[object]) -> str:
    shown = sorted(key if isinstance(key, str) and _PLAIN.fullmatch(key) else _show(key) for key in keys)
    more = f" and {len(shown) - 10} more" if len(shown) > 10 else ""
    return ", ".join(shown[:10]) + more


def _show(value: object) -> str:
    """A value for an error message: a short printable excerpt of a string, else its type."""
    if isinstance(value, str):
        return repr(value[:40]) + ("..." if len(value) > 40 else "")
    if value is None or isinstance(value, bool):
        return repr(value)
    kind = _kind(value)
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def chat_request(body: object, where: str = "") -> tuple[object, object]:
    """(model, messages) of an OpenAI chat completion request; every other parameter is refused by name, since
    the gateway cannot honour it (the assistant's settings decide the model, sampling and tools). A null value
    counts as not given; ``n: 1`` and ``stream: false`` are accepted.

    Raises:
        InvalidMessages: ``<where>.<param>: ...`` naming the first parameter refused (sorted), or a missing model.
    """
    prefix = where + "." if where else ""
    if not isinstance(body, dict):
        raise InvalidMessages(f"{where or 'body'}: must be an object with model and messages, got {_kind(body)}")
    for key in sorted(body, key=str):
        value = body[key]
        if key in CHAT_SUPPORTED or value is None:
            continue
        if key in CHAT_DEFAULTS and value == CHAT_DEFAULTS[key] and type(value) is type(CHAT_DEFAULTS[key]):
            continue
        if key in CHAT_DEFAULTS:
            raise InvalidMessages(
                f"{prefix}{key}: only {json.dumps(CHAT_DEFAULTS[key])} is supported by the gateway, got "
                + (json.dumps(value) if isinstance(value, bool | int | float) else _show(value))
            )
        raise InvalidMessages(
            f"{prefix}{_show(key) if not isinstance(key, str) else key}: not supported by the gateway (the Smart Chat "
            "assistant's own settings decide the model, sampling and tools); remove it. Supported: model, messages"
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidMessages(f"{prefix}model: required, the Smart Chat assistant's id (a string)")
    return model, body.get("messages")
