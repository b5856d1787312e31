"""API keys as a plain class: where keys come from, what is refused, the per-key limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.auth import KEYS_ENV, KEYS_FILE_ENV, Access, ApiKeys, Denied, generated_key, is_loopback, read_keys


def test_keys_come_from_a_file_then_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team A\nalpha\n\n  beta  \n")
    assert read_keys(str(keys_file)) == ["alpha", "beta"]
    monkeypatch.setenv(KEYS_ENV, "gamma, delta")
    assert read_keys(None) == ["gamma", "delta"]
    monkeypatch.setenv(KEYS_FILE_ENV, str(keys_file))  # the mounted Secret wins over the variable
    assert read_keys(None) == ["alpha", "beta"]


def test_keys_are_checked_and_limited_per_key(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("alpha\nbeta\n")
    keys = ApiKeys(Access(keys_file=str(keys_file), max_in_flight_per_key=2))
    for header, status in ((None, 401), ("alpha", 401), ("Basic alpha", 401), ("Bearer ", 401), ("Bearer alp", 401)):
        with pytest.raises(Denied) as denied:
            keys.admit(header)
        assert denied.value.status == status and "alp" not in denied.value.message
    a1, a2 = keys.admit("Bearer alpha"), keys.admit("bearer alpha")
    assert a1 == a2 and "alpha" not in a1  # an id safe to log, not the key
    with pytest.raises(Denied) as busy:
        keys.admit("Bearer alpha")
    assert busy.value.status == 429
    assert keys.admit("Bearer beta") != a1  # the other key is not limited by this one
    keys.release(a1)
    assert keys.admit("Bearer alpha") == a1


def test_keys_may_be_off_only_on_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEYS_ENV, raising=False)
    monkeypatch.delenv(KEYS_FILE_ENV, raising=False)
    with pytest.raises(ValueError, match="none are set"):
        ApiKeys(Access())  # required, and none given: the server must not start open
    off = Access(required=False)
    assert ApiKeys(off).admit(None) is None
    off.check_host("127.0.0.1")
    off.check_host("::1")
    with pytest.raises(ValueError, match="only on a loopback"):
        off.check_host("0.0.0.0")
    assert is_loopback("localhost") and not is_loopback("10.0.0.1") and not is_loopback("example.com")


def test_a_generated_key_is_private_and_one_others_could_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "braid" / "api_key"
    assert generated_key(path) == path
    key = path.read_text()
    assert (path.parent.stat().st_mode & 0o777, path.stat().st_mode & 0o777) == (0o700, 0o600)
    assert generated_key(path) == path and path.read_text() == key  # kept across restarts
    path.chmod(0o644)  # readable by others: no secret
    with pytest.raises(ValueError, match="closed to others"):
        generated_key(path)
    path.chmod(0o600)
    path.parent.chmod(0o755)  # a folder others may enter
    with pytest.raises(ValueError, match="closed to others"):
        generated_key(path)
