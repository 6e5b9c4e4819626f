"""Verify: the audit chain recomputed from its rows, checked against the signed anchors. Pure: the rows come
from the caller (``store.chain.verify`` streams them), so an auditor's own reader can use it too.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from .anchors import Anchor
from .events import GENESIS, chain_hash, chain_hash_v1, chain_hash_v2

__all__ = ["Problem", "Span", "VerifyReport", "check", "check_span"]


@dataclass(frozen=True)
class Problem:
    """The first thing wrong: ``seq`` is the first bad event (None: the anchor file itself)."""

    seq: int | None
    message: str


@dataclass(frozen=True)
class VerifyReport:
    events: int
    anchors: int
    problem: Problem | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.problem is None


def check(
    rows: Iterable[Any], anchors: list[Anchor], key: bytes, *, v2_from: int = 1, v3_from: int = 1
) -> VerifyReport:
    """Walk ``rows`` (every event after the newest "base" anchor, in seq order, each a mapping of the chained
    columns and ``prev_hash``, ``row_hash``) and check them and every anchor's signature (``key``). Events from
    seq ``v3_from`` on are in format v3, from ``v2_from`` v2, before that v1."""
    started = time.perf_counter()
    problem = _bad_signature(anchors, key)
    bases = [a for a in anchors if a.kind == "base"]
    base = max(bases, key=lambda a: a.seq) if bases else Anchor(0, GENESIS, "", "")
    by_seq = {a.seq: a for a in anchors if a.kind == "head" and a.seq > base.seq}
    count = 0
    if problem is None:
        last_good, problem = _walk(iter(rows), by_seq, base, v2_from, v3_from)
        count = last_good - base.seq
    return VerifyReport(count, len(anchors), problem, time.perf_counter() - started)


@dataclass(frozen=True)
class Span:
    """What a period of the chain looks like in the database, read by index (no walk): its first and last seq,
    how many events it holds, the stored hash at each anchored seq in it, and the shown events with their
    neighbours (each a mapping of the chained columns and ``prev_hash``, ``row_hash``), by seq."""

    first: int
    last: int
    count: int
    stored: dict[int, str]
    rows: dict[int, Any]
    shown: tuple[int, ...]
    #: The hash the event before ``first`` has (the genesis, or the base a drop left), when it is not in ``rows``.
    base_hash: str | None = None


def check_span(span: Span, anchors: list[Anchor], key: bytes, *, v2_from: int = 1, v3_from: int = 1) -> VerifyReport:
    """The period check of an access report: every anchor's signature; no event missing between the period's
    first and last seq; the stored hash at each signed anchor in the period is the signed one (a chain rewritten
    from any event on differs there); and each shown event recomputed and linked to both its neighbours. An
    event outside the report altered without its hash being recomputed is found by :func:`check` only."""
    started = time.perf_counter()
    problem = _bad_signature(anchors, key) or _gap(span) or _unanchored(span, anchors)
    if problem is None:
        problem = next(filter(None, (_shown(span, seq, v2_from, v3_from) for seq in span.shown)), None)
    return VerifyReport(span.count, len(anchors), problem, time.perf_counter() - started)


def _gap(span: Span) -> Problem | None:
    expected = span.last - span.first + 1 if span.count else 0
    if span.count == expected:
        return None
    return Problem(None, f"{expected - span.count} event(s) between seq {span.first} and {span.last} are missing")


def _unanchored(span: Span, anchors: list[Anchor]) -> Problem | None:
    for anchor in sorted(anchors, key=lambda a: a.seq):
        if (
            anchor.kind == "head"
            and span.first <= anchor.seq <= span.last
            and span.stored.get(anchor.seq) != anchor.row_hash
        ):
            return Problem(
                anchor.seq,
                f"the log does not match the signed anchor at seq {anchor.seq} (signed {anchor.at}): "
                "events up to it were rewritten",
            )
    return None


def _shown(span: Span, seq: int, v2_from: int, v3_from: int) -> Problem | None:
    row, before, after = span.rows[seq], span.rows.get(seq - 1), span.rows.get(seq + 1)
    prev = before["row_hash"] if before is not None else (span.base_hash or GENESIS)
    if row["prev_hash"] != prev:
        return _broken_link(seq, False)
    if _hash(prev, row, seq, v2_from, v3_from) != row["row_hash"]:
        return Problem(seq, f"event seq {seq} was altered: its contents do not match its hash")
    if after is not None and after["prev_hash"] != row["row_hash"]:
        return _broken_link(seq + 1, False)
    return None


def _bad_signature(anchors: list[Anchor], key: bytes) -> Problem | None:
    """The first anchor line whose signature fails, or (a linked line, v2) that does not follow the line before it
    in the file: a line removed, or lines moved. Lines cut off the end of the file leave no trace here."""
    before: Anchor | None = None
    for anchor in anchors:
        expected = hmac.new(key, anchor.message(), hashlib.sha256).hexdigest()
        if anchor.seq < 0 or not hmac.compare_digest(expected, anchor.mac):
            return Problem(None, f"anchor line {anchor.line} has a bad signature: the anchor file was altered")
        linked = "" if before is None else before.mac
        if anchor.prev is not None and anchor.prev != linked:
            if before is None:
                found = (
                    f"anchor line {anchor.line} links to a line before it that is not in the file: lines were removed"
                )
            else:
                found = (
                    f"anchor line {anchor.line} does not follow line {before.line}: a line of the anchor file was "
                    "removed, or lines were moved"
                )
            return Problem(None, found)
        before = anchor
    return None


def _broken_link(seq: int, skips_one: bool) -> Problem:
    if skips_one:  # seq follows seq - 2 directly: the event between was not in the original chain
        return Problem(seq - 1, f"event seq {seq - 1} was inserted: event seq {seq} follows event seq {seq - 2}")
    return Problem(
        seq, f"event seq {seq} does not follow event seq {seq - 1}: events were reordered, or one was deleted before it"
    )


def _walk(
    rows: Iterator[Any], anchors: dict[int, Anchor], base: Anchor, v2_from: int = 1, v3_from: int = 1
) -> tuple[int, Problem | None]:
    """Walk the chain from ``base`` (the genesis, or the signed end of a deliberate drop); events
    from seq ``v3_from`` on are in format v3, those from ``v2_from`` in v2, those before in v1."""
    prev, before, expected, matched = base.row_hash, "", base.seq + 1, base.seq
    for row in rows:
        seq = row["seq"]
        if seq != expected:
            gap = f"event seq {expected} is missing: the log jumps from seq {expected - 1} to seq {seq}"
            return expected - 1, Problem(expected, f"{gap} (events were deleted)")
        if row["prev_hash"] != prev:
            return seq - 1, _broken_link(seq, row["prev_hash"] == before)
        before, prev = prev, _hash(prev, row, seq, v2_from, v3_from)
        if prev != row["row_hash"]:
            return seq - 1, Problem(seq, f"event seq {seq} was altered: its contents do not match its hash")
        anchor = anchors.get(seq)
        if anchor is not None and anchor.row_hash != prev:
            return seq, Problem(
                seq,
                f"the log does not match the signed anchor at seq {seq} (signed {anchor.at}): "
                f"the events after seq {matched} up to seq {seq} were rewritten",
            )
        if anchor is not None:
            matched = seq
        expected += 1
    last = expected - 1
    beyond = [a for a in anchors.values() if a.seq > last]
    if beyond:
        top = max(beyond, key=lambda a: a.seq)
        ends = f"the log ends at seq {last}, but an anchor signed {top.at} covers seq {top.seq}"
        return last, Problem(last + 1, f"{ends}: events after seq {last} were removed (a truncated tail)")
    return last, None


def _hash(prev: str, row: Any, seq: int, v2_from: int, v3_from: int) -> str:
    if seq >= v3_from:
        return chain_hash(prev, row)
    return chain_hash_v2(prev, row) if seq >= v2_from else chain_hash_v1(prev, row)
