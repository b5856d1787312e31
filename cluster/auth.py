"""Who may call Braid's HTTP API: bearer API keys, and how many requests each may have in flight.

Keys come from a file (one per line; `#` comments), or the environment: the file named by
`BRAID_API_KEYS_FILE` (the Helm chart mounts its Secret there), else `BRAID_API_KEYS`
(comma-separated). Only their SHA-256 digests are kept; a presented key is hashed and
compared in constant time. A 401 never echoes the key, and nothing here logs one.

Keys are required unless the server listens on loopback and its operator turned them off
(`braid serve --no-auth`); `Access.check_host` enforces that. Given none, `braid serve`
generates one (`generated_key`) into a file only its user may read.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

KEYS_FILE_ENV = "BRAID_API_KEYS_FILE"
KEYS_ENV = "BRAID_API_KEYS"
MAX_IN_FLIGHT_PER_KEY = 64


class Denied(Exception):
    """A request refused by access control: `status` 401 (no or wrong key) or 429 (key busy)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(slots=True, frozen=True)
class Access:
    """The access policy of one server (no keys in it: it travels in Serve's config)."""

    required: bool = True
    keys_file: str | None = None  # None: from the environment (see the module docstring)
    max_in_flight_per_key: int = MAX_IN_FLIGHT_PER_KEY

    def __post_init__(self) -> None:
        if self.max_in_flight_per_key < 1:
            raise ValueError(f"max_in_flight_per_key must be >= 1, got {self.max_in_flight_per_key}")

    def check_host(self, host: str) -> None:
        """Keys may be off only on a loopback address."""
        if not self.required and not is_loopback(host):
            raise ValueError(f"API keys can be turned off only on a loopback address, not {host!r}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def read_keys(keys_file: str | None) -> list[str]:
    """The keys of `keys_file`, or of the environment when it is None."""
    path = keys_file or os.environ.get(KEYS_FILE_ENV)
    lines = Path(path).read_text().splitlines() if path else os.environ.get(KEYS_ENV, "").split(",")
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


class ApiKeys:
    """Checks a request's `Authorization: Bearer <key>` and counts its key's requests in flight."""

    def __init__(self, access: Access) -> None:
        self.access = access
        self.digests = [digest(k) for k in read_keys(access.keys_file)] if access.required else []
        if access.required and not self.digests:
            raise ValueError(f"API keys are required but none are set: give a keys file, {KEYS_FILE_ENV} or {KEYS_ENV}")
        self.in_flight: Counter[str] = Counter()  # key id -> requests

    def admit(self, authorization: str | None) -> str | None:
        """The key's id (a digest prefix, safe to log) once admitted; None when keys are off."""
        if not self.access.required:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Denied(401, "missing API key: send 'Authorization: Bearer <key>'")
        presented = digest(key.strip())
        matches = [hmac.compare_digest(presented, known) for known in self.digests]  # every key compared: no early exit
        if not any(matches):
            raise Denied(401, "invalid API key")
        key_id = presented.hex()[:12]
        if self.in_flight[key_id] >= self.access.max_in_flight_per_key:
            raise Denied(429, f"this API key has {self.access.max_in_flight_per_key} requests in flight; retry later")
        self.in_flight[key_id] += 1
        return key_id

    def release(self, key_id: str | None) -> None:
        if key_id is not None:
            self.in_flight[key_id] -= 1


GENERATED_KEY_FILE = Path.home() / ".config" / "braid" / "api_key"


def generated_key(path: Path = GENERATED_KEY_FILE) -> Path:
    """A random API key in `path`, kept across restarts. Made in a folder only this user may
    enter, readable by this user only; an existing key is used only if it is still so (a
    key someone else could have written or read is no secret): else a clear error."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        for where in (path.parent, path):
            info = where.lstat()
            if info.st_uid != os.getuid() or info.st_mode & 0o077 or where.is_symlink():
                raise ValueError(f"{where} must be yours and closed to others (chmod go-rwx) to hold an API key; "
                                 "remove it, or give --api-keys-file") from None  # fmt: skip
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path
