from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from qbgw.audit import crypto
from qbgw.audit.crypto import DecryptionFailed, Keyring, aad_for, open_keyring
from qbgw.errors import ConfigError, QbgwError

K1 = bytes(range(32))
K2 = bytes(range(100, 132))
AAD = aad_for("jobs", "payload", "job-1")


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def keyring(**keys: bytes) -> Keyring:
    keys = keys or {"k1": K1}
    return Keyring(keys, next(iter(keys)))


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


def flip(envelope: str, field: int, index: int) -> str:
    parts = envelope.split(":")
    raw = bytearray(base64.urlsafe_b64decode(parts[field] + "=" * (-len(parts[field]) % 4)))
    raw[index] ^= 0x01
    parts[field] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    return ":".join(parts)


# --- encrypt / decrypt -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plaintext", ["hello", "", "Zoë — café, naïve 😀🩺 中文", '{"messages": [1]}' * 500, "x\ud800y"]
)
def test_round_trip(plaintext: str) -> None:
    ring = keyring()
    envelope = ring.encrypt(plaintext, aad=AAD)
    assert ring.decrypt(envelope, aad=AAD) == plaintext
    assert plaintext == "" or plaintext not in envelope


def test_the_envelope_is_versioned_names_the_primary_and_has_no_stray_colons() -> None:
    ring = Keyring({"k1": K1, "k2": K2}, "k2")
    envelope = ring.encrypt("secret", aad=AAD)
    assert re.fullmatch(r"v1:k2:[A-Za-z0-9_-]{16}:[A-Za-z0-9_-]+", envelope)
    assert Keyring.key_id_of(envelope) == "k2"


def test_two_encryptions_of_the_same_plaintext_differ() -> None:
    ring = keyring()
    first, second = ring.encrypt("same", aad=AAD), ring.encrypt("same", aad=AAD)
    assert first != second
    assert first.split(":")[2] != second.split(":")[2]  # the nonce


@pytest.mark.parametrize(
    "other_aad",
    [aad_for("jobs", "payload", "job-2"), aad_for("jobs", "answer", "job-1"), aad_for("events", "payload", "job-1")],
    ids=["another row", "another column", "another table"],
)
def test_a_ciphertext_moved_elsewhere_fails(other_aad: str) -> None:
    ring = keyring()
    envelope = ring.encrypt("PHI: blood type AB-", aad=AAD)
    with pytest.raises(DecryptionFailed, match="authentication failed") as info:
        ring.decrypt(envelope, aad=other_aad)
    assert "blood" not in str(info.value)


def test_the_error_names_the_row_not_the_contents() -> None:
    ring = keyring()
    envelope = ring.encrypt("PHI", aad=AAD)
    with pytest.raises(DecryptionFailed) as info:
        ring.decrypt(envelope, aad=aad_for("jobs", "payload", "job-9"))
    assert str(info.value) == (
        "cannot decrypt jobs.payload of row job-9: authentication failed (wrong key, moved or altered ciphertext)"
    )


@pytest.mark.parametrize(("field", "index"), [(3, 0), (3, -1), (2, 0)], ids=["ciphertext", "tag", "nonce"])
def test_a_flipped_bit_fails(field: int, index: int) -> None:
    ring = keyring()
    envelope = ring.encrypt("hello world", aad=AAD)
    with pytest.raises(DecryptionFailed, match="authentication failed"):
        ring.decrypt(flip(envelope, field, index), aad=AAD)


def test_a_changed_key_id_fails() -> None:
    ring = Keyring({"k1": K1, "k2": K2}, "k1")
    envelope = ring.encrypt("hello", aad=AAD)
    with pytest.raises(DecryptionFailed, match="authentication failed"):
        ring.decrypt(envelope.replace("v1:k1:", "v1:k2:"), aad=AAD)
    with pytest.raises(DecryptionFailed, match="unknown key id 'k9'"):
        ring.decrypt(envelope.replace("v1:k1:", "v1:k9:"), aad=AAD)


def test_a_ciphertext_under_the_same_key_bytes_but_another_id_fails() -> None:
    # The key id is bound into the AAD: relabelling an envelope is detected even with equal keys.
    envelope = Keyring({"a": K1}, "a").encrypt("hello", aad=AAD)
    with pytest.raises(DecryptionFailed, match="authentication failed"):
        Keyring({"b": K1}, "b").decrypt(envelope.replace("v1:a:", "v1:b:"), aad=AAD)


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        ("plain text", "not an encrypted value"),
        ("", "not an encrypted value"),
        ("a:b:c:d", "not an encrypted value"),
        ("v2:k1:AAAA:AAAA", "unknown envelope version 'v2'"),
        ("v1:k1:AAAA:AAAA", "malformed envelope"),  # nonce too short
        ("v1:k1:AAAAAAAAAAAAAAAA:AAAA", "malformed envelope"),  # shorter than a tag
        ("v1:k 1:AAAAAAAAAAAAAAAA:" + "A" * 24, "malformed envelope"),
        ("v1:k1:AAAAAAAAAAAAAAA=:" + "A" * 24, "malformed envelope"),
        ("v1:k1:AAAAAAAAAAAAAAAAA:" + "A" * 24, "malformed envelope"),  # impossible base64 length
        ("v1:k1:AAAAAAAAAAAAAAAA:" + "A" * 23 + " ", "malformed envelope"),
        ("v1:k1:AAAAAAAAAAAAAAAA:" + "A" * 23 + "+", "malformed envelope"),  # standard, not url-safe
        ("v1:k1:AAAAAAAAAAAAAAAA:" + "A" * 23 + "é", "malformed envelope"),
        ("v1:k1:AAAAAAAAAAAAAAAA:" + "A" * 23 + "\n", "malformed envelope"),
    ],
)
def test_what_is_not_an_envelope_fails(envelope: str, reason: str) -> None:
    with pytest.raises(DecryptionFailed, match=re.escape(reason)):
        keyring().decrypt(envelope, aad=AAD)
    with pytest.raises(DecryptionFailed):
        Keyring.key_id_of(envelope)


def test_decryption_failed_is_a_picklable_qbgw_error() -> None:
    error = DecryptionFailed("jobs.payload of row 1", "authentication failed")
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, QbgwError)
    assert type(copy) is DecryptionFailed
    assert str(copy) == str(error) == "cannot decrypt jobs.payload of row 1: authentication failed"
    assert (copy.where, copy.reason) == (error.where, error.reason)


def test_a_custom_aad_is_not_echoed() -> None:
    ring = keyring()
    envelope = ring.encrypt("x", aad="tenant=Jane Doe")
    with pytest.raises(DecryptionFailed) as info:
        ring.decrypt(envelope, aad="tenant=John Doe")
    assert "Doe" not in str(info.value)
    assert str(info.value).startswith("cannot decrypt a value:")


# --- the keyring -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "primary", "message"),
    [
        ({"k1": K1[:31]}, "k1", "key 'k1' is not 32 bytes"),
        ({"k1": K1 + b"x"}, "k1", "key 'k1' is not 32 bytes"),
        ({"k1": K1}, "k2", "the primary key id 'k2' is not among the keys"),
        ({"k:1": K1}, "k:1", "a key id is not 1-32 characters"),
        ({"": K1}, "", "a key id is not 1-32 characters"),
        ({"k" * 33: K1}, "k" * 33, "a key id is not 1-32 characters"),
    ],
)
def test_the_constructor_validates(keys: dict[str, bytes], primary: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Keyring(keys, primary)


def test_repr_and_str_never_show_key_material() -> None:
    ring = Keyring({"k1": K1, "k2": K2}, "k2")
    assert repr(ring) == "Keyring(primary='k2', keys=['k1', 'k2'])"
    for text in (repr(ring), str(ring), f"{ring}"):
        for key in (K1, K2):
            assert b64(key) not in text
            assert base64.urlsafe_b64encode(key).decode() not in text
            assert key.hex() not in text
    assert ring.key_ids == ("k1", "k2")
    assert ring.primary == "k2"


def test_a_keyring_refuses_to_be_pickled() -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(keyring())


def test_an_old_key_still_decrypts_after_rotation() -> None:
    old = keyring()
    before = old.encrypt("old row", aad=AAD)
    new, key_id = old.with_new_primary()
    assert re.fullmatch(r"k\d{8}T\d{6}", key_id)
    assert new.primary == key_id
    assert new.key_ids == ("k1", key_id)
    assert old.primary == "k1"
    assert old.key_ids == ("k1",)
    assert new.decrypt(before, aad=AAD) == "old row"
    after = new.encrypt("new row", aad=AAD)
    assert Keyring.key_id_of(after) == key_id
    assert new.decrypt(after, aad=AAD) == "new row"


def test_a_colliding_key_id_gets_a_random_suffix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crypto, "_new_key_id", lambda: "k20261125T185501")
    first, id1 = keyring().with_new_primary()
    second, id2 = first.with_new_primary()
    third, id3 = second.with_new_primary()
    assert id1 == "k20261125T185501"
    assert re.fullmatch(r"k20261125T185501-[0-9a-f]{6}", id2)
    assert re.fullmatch(r"k20261125T185501-[0-9a-f]{6}", id3)
    assert len({id1, id2, id3}) == 3
    assert len(third.key_ids) == 4


def test_save_and_load_round_trip_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "keyring.json"
    ring = Keyring({"k1": K1, "k2": K2}, "k2")
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"version": 1, "primary": "k2", "keys": {"k1": b64(K1), "k2": b64(K2)}}
    assert os.listdir(path.parent) == ["keyring.json"]  # no temp file left behind
    loaded = Keyring.load(path)
    assert loaded.primary == "k2"
    assert loaded.key_ids == ("k1", "k2")
    assert loaded.decrypt(ring.encrypt("x", aad=AAD), aad=AAD) == "x"


def test_save_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    keyring().save(path)
    rotated, key_id = Keyring.load(path).with_new_primary()
    rotated.save(path)
    assert Keyring.load(path).primary == key_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_save_reports_an_unwritable_place(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot be written"):
        keyring().save(blocker / "keyring.json")


def test_a_running_worker_learns_a_rotated_key_on_decrypt(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    keyring().save(path)
    worker = Keyring.load(path)  # a worker process, started before the rotation
    operator = Keyring.load(path)  # `qbgw keys rotate` in another process
    rotated, key_id = operator.with_new_primary()
    rotated.save(path)
    envelope = rotated.encrypt("written after rotation", aad=AAD)
    assert key_id not in worker.key_ids
    assert worker.decrypt(envelope, aad=AAD) == "written after rotation"
    assert worker.primary == key_id
    assert worker.key_ids == ("k1", key_id)
    assert worker.reload() is False  # nothing changed since


def test_a_key_unknown_even_after_reload_fails(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    keyring().save(path)
    foreign = Keyring({"k7": K2}, "k7").encrypt("x", aad=AAD)
    with pytest.raises(DecryptionFailed, match="unknown key id 'k7'"):
        Keyring.load(path).decrypt(foreign, aad=AAD)


def test_reload_without_a_file_is_a_no_op() -> None:
    assert keyring().reload() is False


def test_concurrent_threads_meeting_a_new_key_all_decrypt(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    keyring().save(path)
    worker = Keyring.load(path)
    rotated, _ = Keyring.load(path).with_new_primary()
    rotated.save(path)
    envelopes = [rotated.encrypt(f"row {i}", aad=aad_for("jobs", "payload", str(i))) for i in range(16)]
    results: dict[int, str] = {}
    barrier = threading.Barrier(len(envelopes))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = worker.decrypt(envelopes[i], aad=aad_for("jobs", "payload", str(i)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(envelopes))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {i: f"row {i}" for i in range(16)}


# --- loading a keyring file --------------------------------------------------------------------

GOOD = {"version": 1, "primary": "k1", "keys": {"k1": b64(K1)}}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"{not json", "is not valid JSON"),
        (b"\xff\xfe\x00garbage", "is not valid JSON"),
        (b"", "is not valid JSON"),
        (json.dumps([GOOD]).encode(), "expected {"),
        (json.dumps({**GOOD, "version": 2}).encode(), "expected {"),
        (json.dumps({"primary": "k1", "keys": GOOD["keys"]}).encode(), "expected {"),
        (json.dumps({**GOOD, "primary": 1}).encode(), '"primary" must be a key id'),
        (json.dumps({**GOOD, "keys": []}).encode(), '"primary" must be a key id'),
        (json.dumps({**GOOD, "keys": {}}).encode(), '"primary" must be a key id'),
        (json.dumps({**GOOD, "keys": {"k1": 5}}).encode(), "must be a base64 string"),
        (json.dumps({**GOOD, "keys": {"k1": "not base64!"}}).encode(), "key 'k1' is not valid base64"),
        (json.dumps({**GOOD, "keys": {"k1": b64(K1[:16])}}).encode(), "key 'k1' is 16 bytes, not 32"),
        (json.dumps({**GOOD, "primary": "k2"}).encode(), "the primary key id 'k2' is not among the keys"),
        (json.dumps({**GOOD, "primary": "k 1", "keys": {"k 1": b64(K1)}}).encode(), "a key id is not"),
    ],
)
def test_load_names_the_file_and_the_problem(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        Keyring.load(path)
    message = str(info.value)
    assert str(path) in message
    assert problem in message
    assert b64(K1) not in message


def test_load_of_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=re.escape(f"keyring file {path} does not exist")):
        Keyring.load(path)


def test_load_of_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.mkdir()  # a directory cannot be read as a file, even by root
    with pytest.raises(ConfigError, match=re.escape(f"keyring file {path} cannot be read")):
        Keyring.load(path)


# --- QBGW_ENCRYPTION_KEYS ----------------------------------------------------------------------


def test_from_spec_takes_the_first_key_as_primary() -> None:
    ring = Keyring.from_spec(f" k2 : {b64(K2)} , k1:{b64(K1)},")
    assert ring.primary == "k2"
    assert ring.key_ids == ("k2", "k1")
    assert Keyring.from_spec(f"k1:{b64(K1)}").decrypt(Keyring({"k1": K1}, "k1").encrypt("x", aad=AAD), aad=AAD) == "x"
    assert ring.reload() is False  # not built from a file


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("", "QBGW_ENCRYPTION_KEYS holds no keys"),
        (" , ", "QBGW_ENCRYPTION_KEYS holds no keys"),
        (b64(K1), "entry 1 is not <key id>:<base64 of 32 bytes>"),
        (f"k1:{b64(K1)},{b64(K2)}", "entry 2 is not <key id>:<base64 of 32 bytes>"),
        (f"k/1:{b64(K1)}", "entry 1 is not <key id>"),
        (f":{b64(K1)}", "entry 1 is not <key id>"),
        (f"k1:{b64(K1)},k1:{b64(K2)}", "key id 'k1' is listed twice"),
        (f"k1:{b64(K1)[:-2]}", "key 'k1' is not valid base64"),
        (f"k1:{b64(K1)}$", "key 'k1' is not valid base64"),
        (f"k1:{b64(K1[:24])}", "key 'k1' is 24 bytes, not 32"),
        ("k1:", "key 'k1' is 0 bytes, not 32"),
    ],
)
def test_from_spec_errors_never_quote_the_key(spec: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        Keyring.from_spec(spec)
    message = str(info.value)
    assert problem in message
    assert message.startswith("QBGW_ENCRYPTION_KEYS")
    for key in (K1, K2, K1[:24]):
        assert b64(key)[:12] not in message


# --- open_keyring ------------------------------------------------------------------------------


def test_open_keyring_prefers_the_spec_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring({"file": K1}, "file").save(path)
    ring = open_keyring(spec=f"env:{b64(K2)}", path=path, create=True)
    assert ring.key_ids == ("env",)


def test_open_keyring_prefers_the_file_over_creating(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "keyring.json"
    Keyring({"file": K1}, "file").save(path)
    before = path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="qbgw.crypto"):
        ring = open_keyring(spec="  ", path=path, create=True)
    assert ring.key_ids == ("file",)
    assert path.read_bytes() == before
    assert not caplog.records


def test_open_keyring_creates_a_0600_file_and_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "data" / "dir" / "keyring.json"
    with caplog.at_level(logging.WARNING, logger="qbgw.crypto"):
        ring = open_keyring(spec="", path=path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.load(path).key_ids == ring.key_ids
    assert len(ring.key_ids) == 1
    [record] = caplog.records
    assert record.name == "qbgw.crypto"
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert str(path) in message
    assert "unreadable" in message
    assert "QBGW_ENCRYPTION_KEYS" in message
    assert "secrets manager" in message
    envelope = ring.encrypt("x", aad=AAD)
    assert open_keyring(spec="", path=path, create=True).decrypt(envelope, aad=AAD) == "x"  # the same key next time


def test_creating_never_overwrites_a_file_another_process_made_first(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    Keyring({"theirs": K1}, "theirs").save(path)
    assert crypto._write_atomically(path, b"{}", replace=False) is False
    assert Keyring.load(path).key_ids == ("theirs",)
    assert os.listdir(tmp_path) == ["keyring.json"]


def test_open_keyring_without_create_says_how_to_configure(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    with pytest.raises(ConfigError, match="no encryption key is configured") as info:
        open_keyring(spec="", path=path, create=False)
    assert "QBGW_ENCRYPTION_KEYS" in str(info.value)
    assert str(path) in str(info.value)
    assert not path.exists()


def test_open_keyring_reports_a_malformed_spec(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="QBGW_ENCRYPTION_KEYS"):
        open_keyring(spec="garbage", path=tmp_path / "keyring.json", create=True)
    assert not (tmp_path / "keyring.json").exists()


def test_a_running_producer_encrypts_with_a_rotated_primary_within_follow_seconds(tmp_path: Path) -> None:
    from qbgw.audit.crypto import FOLLOW_SECONDS

    path = tmp_path / "keyring.json"
    keyring().save(path)
    producer = Keyring.load(path)  # a producer process, started before the rotation
    assert Keyring.key_id_of(producer.encrypt("before", aad=AAD)) == "k1"
    rotated, key_id = Keyring.load(path).with_new_primary()
    rotated.save(path)  # `qbgw keys rotate` in another process
    time.sleep(FOLLOW_SECONDS + 0.05)
    assert Keyring.key_id_of(producer.encrypt("after", aad=AAD)) == key_id


def test_a_damaged_keyring_file_keeps_the_keys_in_memory(tmp_path: Path) -> None:
    from qbgw.audit.crypto import FOLLOW_SECONDS

    path = tmp_path / "keyring.json"
    keyring().save(path)
    producer = Keyring.load(path)
    path.write_text("{not json")
    time.sleep(FOLLOW_SECONDS + 0.05)
    envelope = producer.encrypt("still works", aad=AAD)
    assert Keyring.key_id_of(envelope) == "k1"
    assert producer.decrypt(envelope, aad=AAD) == "still works"
