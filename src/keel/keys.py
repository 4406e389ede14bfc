"""Virtual keys: what a caller of the keel server presents, and what it may do.

A key is shown once, when it is created; the store keeps only its SHA-256
(keys are 192 random bits, so a fast hash is safe: there is nothing to guess
from) and its first characters, to tell keys apart in a list. A key has a
name, which is what traces, limits and budgets are attributed to, so
revoking a key and creating a new one with the same name keeps the team's
spend. At most one active key has a given name. Besides its models, limits
and budgets, a key carries the RAG collections it may read and write.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keel.config import KeyConfig
from keel.errors import InputError
from keel.store.base import Store
from keel.trace import dumps

__all__ = [
    "KeyRecord", "bump_revision", "create_key", "hash_key", "key_by_hash", "keys_by_hash", "keys_revision", "list_keys",
    "parse_budget", "revoke_key",
]  # fmt: skip

PREFIX = "sk-keel-"
SHOWN = 12  # characters of a key kept in clear, to tell keys apart
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_COLUMNS = (
    "key_id, name, key_prefix, created_at, revoked_at, rpm, tpm, daily_budget_usd, monthly_budget_usd, models,"
    " metadata, collections, collections_write"
)
#: A RAG collection's name, as `keel.rag` accepts it (this module sits below the RAG layer, so it repeats it).
COLLECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
MAX_COLLECTIONS = 1000  # per scope: a key's row stays small


@dataclass(frozen=True)
class KeyRecord:
    key_id: str
    name: str
    prefix: str
    created_at: float
    revoked_at: float | None = None
    limits: KeyConfig = field(default_factory=KeyConfig)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def to_json(self) -> dict[str, Any]:
        """What the admin API and `keel keys list --json` show: everything but the key."""
        lim = self.limits
        return {
            "id": self.key_id, "name": self.name, "prefix": self.prefix, "created_at": self.created_at,
            "revoked_at": self.revoked_at, "rpm": lim.rpm, "tpm": lim.tpm, "daily_budget_usd": lim.daily_budget_usd,
            "monthly_budget_usd": lim.monthly_budget_usd,
            "models": _listed(lim.models), "collections": _listed(lim.collections),
            "collections_write": _listed(lim.collections_write), "metadata": self.metadata,
        }  # fmt: skip


def _listed(names: tuple[str, ...] | None) -> list[str] | None:
    return list(names) if names is not None else None


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_budget(text: str) -> tuple[str, float]:
    """'50/month' -> ('monthly', 50.0); '5/day' -> ('daily', 5.0)."""
    amount, _, period = text.strip().lstrip("$").partition("/")
    periods = {"day": "daily", "daily": "daily", "month": "monthly", "monthly": "monthly"}
    try:
        value = float(amount)
    except ValueError:
        value = -1.0
    if period.strip().lower() not in periods or not math.isfinite(value) or value < 0:
        raise InputError(f"budget {text!r} is not AMOUNT/day or AMOUNT/month (for example 50/month)")
    return periods[period.strip().lower()], value


def _check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise InputError(
            f"key name {name!r}: use 1-64 letters, digits, '_', '.', ':' or '-', starting with a letter or digit"
        )


def _check_metadata(metadata: dict[str, Any]) -> None:
    text = json.dumps(metadata)
    if "\\u0000" in text or len(text) > 8192:
        raise InputError("key metadata must be under 8 KiB of JSON, without NUL characters")


def _check_collections(limits: KeyConfig) -> None:
    for field_name, names in (("collections", limits.collections), ("collections_write", limits.collections_write)):
        if names is None:
            continue
        if len(names) > MAX_COLLECTIONS:
            raise InputError(f"{field_name}: at most {MAX_COLLECTIONS} collections")
        for name in names:
            if not COLLECTION.fullmatch(name):
                raise InputError(
                    f"{field_name}: {name!r} is not a collection name (1-64 letters, digits, '_', '.' or '-', "
                    "starting with a letter or digit)"
                )


def create_key(
    store: Store, name: str, limits: KeyConfig | None = None, metadata: dict[str, Any] | None = None
) -> tuple[str, KeyRecord]:
    """Store a new key; returns the secret (shown once) and its record."""
    limits = limits or KeyConfig()
    _check_name(name)
    _check_metadata(metadata or {})
    _check_collections(limits)
    secret = PREFIX + secrets.token_urlsafe(24)
    record = KeyRecord(f"key_{secrets.token_hex(6)}", name, secret[:SHOWN], time.time(), None, limits, metadata or {})
    sql = f"INSERT INTO keel_keys ({_COLUMNS}, key_hash) VALUES ({', '.join('?' * 14)})"
    # One statement, no read first: the unique index on active names decides between concurrent creates.
    try:
        with store.transaction() as cur:
            cur.execute(
                sql,
                [
                    record.key_id, name, record.prefix, record.created_at, None, limits.rpm, limits.tpm,
                    limits.daily_budget_usd, limits.monthly_budget_usd,
                    _json_list(store, limits.models), store.json_param(dumps(record.metadata)),
                    _json_list(store, limits.collections), _json_list(store, limits.collections_write),
                    hash_key(secret),
                ],
            )  # fmt: skip
            bump_revision(store, cur)
    except store.integrity_errors:
        raise InputError(f"an active key named {name!r} exists; revoke it first (keel keys revoke {name})") from None
    return secret, record


#: The `keel_revisions` row that every write to `keel_keys` bumps, in the same transaction.
REVISION = "keys"


def bump_revision(store: Store, cur: Any) -> None:
    """Mark the keys changed: servers poll this counter and reload their keys when it moves."""
    cur.execute(
        "INSERT INTO keel_revisions (name, revision) VALUES (?, 1)"
        " ON CONFLICT (name) DO UPDATE SET revision = keel_revisions.revision + 1",
        [REVISION],
    )


def keys_revision(store: Store) -> int:
    """The keys' change counter (0 before the first change)."""
    with store.transaction() as cur:
        cur.execute("SELECT revision FROM keel_revisions WHERE name = ?", [REVISION])
        row = cur.fetchone()
    return int(row[0]) if row is not None else 0


def _json_list(store: Store, names: tuple[str, ...] | None) -> Any:
    return store.json_param(dumps(list(names)) if names is not None else None)


def _loaded(value: Any) -> Any:
    """A JSON column's value: decoded text on SQLite, already decoded on PostgreSQL."""
    return json.loads(value) if isinstance(value, str) else value


def _tuple(value: Any) -> tuple[str, ...] | None:
    names = _loaded(value)
    return tuple(names) if names is not None else None


def _record(row: Sequence[Any]) -> KeyRecord:
    metadata = _loaded(row[10])
    limits = KeyConfig(
        rpm=row[5], tpm=row[6], daily_budget_usd=row[7], monthly_budget_usd=row[8], models=_tuple(row[9]),
        collections=_tuple(row[11]), collections_write=_tuple(row[12]),
    )  # fmt: skip
    return KeyRecord(row[0], row[1], row[2], float(row[3]), _opt_float(row[4]), limits, metadata or {})


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def list_keys(store: Store, *, include_revoked: bool = False) -> list[KeyRecord]:
    where = "" if include_revoked else " WHERE revoked_at IS NULL"
    with store.transaction() as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM keel_keys{where} ORDER BY created_at")
        return [_record(r) for r in cur.fetchall()]


def keys_by_hash(store: Store) -> dict[str, KeyRecord]:
    """Every key, revoked ones included, by the hash a request's key is looked up with."""
    with store.transaction() as cur:
        cur.execute(f"SELECT key_hash, {_COLUMNS} FROM keel_keys")
        return {r[0]: _record(r[1:]) for r in cur.fetchall()}


def key_by_hash(store: Store, key_hash: str) -> KeyRecord | None:
    """The record of a presented key (by its hash), revoked or not; None when unknown."""
    with store.transaction() as cur:
        cur.execute(f"SELECT {_COLUMNS} FROM keel_keys WHERE key_hash = ?", [key_hash])
        row = cur.fetchone()
    return _record(row) if row is not None else None


def revoke_key(store: Store, name_or_id: str) -> KeyRecord:
    """Revoke the active key with this name (or key id, or shown prefix)."""
    if "\x00" in name_or_id or len(name_or_id) > 128:
        raise InputError("a key name or id has at most 128 characters and no NUL")
    with store.transaction() as cur:
        cur.execute(
            f"SELECT {_COLUMNS} FROM keel_keys WHERE revoked_at IS NULL AND (name = ? OR key_id = ? OR key_prefix = ?)",
            [name_or_id, name_or_id, name_or_id],
        )
        rows = cur.fetchall()
        if not rows:
            raise InputError(f"no active key named {name_or_id!r} (keel keys list shows them)")
        if len(rows) > 1:
            raise InputError(f"{name_or_id!r} matches {len(rows)} keys; use the key id")
    now = time.time()
    # the write in a transaction of its own, one statement: a concurrent revoke of the same key finds it done
    with store.transaction() as cur:
        cur.execute("UPDATE keel_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", [now, rows[0][0]])
        if cur.rowcount == 0:
            raise InputError(f"the key {name_or_id!r} was revoked just now by someone else")
        bump_revision(store, cur)
    record = _record(rows[0])
    return KeyRecord(record.key_id, record.name, record.prefix, record.created_at, now, record.limits, record.metadata)
