"""The shared store: PostgreSQL through psycopg 3, for many replicas and workers.

Connections come from a small bounded pool rather than one per thread: threads
come and go, server connections are costly and capped by `max_connections`.
A pooled connection that died while idle (server restarted, idle timeout) is
found out by the transaction's BEGIN and replaced before the caller's code
runs; the other idle connections are dropped with it, since whatever killed
one usually killed them all.

JSON columns are JSONB but are read back as text and decoded by the shared
code, exactly like SQLite's TEXT columns, so a JSON string such as "42" stays
a string. JSONB does not keep key order: decoded dicts compare equal to what
was written but may iterate in another order.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb
from psycopg.types.string import TextLoader

from keel.store.base import Store

__all__ = ["PostgresStore"]

Connection = psycopg.Connection[Any]

#: Advisory lock key that serialises migrate() across processes ("keel" in ASCII).
MIGRATION_LOCK = 0x6B65656C
_QUOTED = re.compile(r"('(?:[^']|'')*')")


class _Pool:
    """At most `max_size` connections in use; idle healthy ones are reused."""

    def __init__(self, connect: Callable[[], Connection], max_size: int, timeout: float) -> None:
        self._connect = connect
        self._timeout = timeout
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_size)
        self._closed = False

    def get(self, *, fresh: bool = False) -> Connection:
        """An idle connection, or a new one when `fresh` or none is idle."""
        if not self._slots.acquire(timeout=self._timeout):
            raise TimeoutError(f"no PostgreSQL connection became free within {self._timeout:g} s")
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle and not fresh else None
            return conn if conn is not None else self._connect()
        except BaseException:
            self._slots.release()
            raise

    def put(self, conn: Connection) -> None:
        """Give a connection back: kept only if healthy and outside any transaction."""
        try:
            if conn.broken:
                self.drop_idle()
            reusable = not conn.closed and conn.info.transaction_status == TransactionStatus.IDLE
            with self._lock:
                if reusable and not self._closed:
                    self._idle.append(conn)
                    return
            conn.close()
        finally:
            self._slots.release()

    def drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        """Close idle connections now and those in use when they come back."""
        with self._lock:
            self._closed = True
        self.drop_idle()


class PostgresStore(Store):
    placeholder: ClassVar[str] = "%s"
    types: ClassVar[dict[str, str]] = {"json": "JSONB", "real": "DOUBLE PRECISION"}
    integrity_errors = (psycopg.IntegrityError,)

    def __init__(
        self, url: str, *, max_connections: int = 10, pool_timeout: float = 30.0, connect_timeout: int = 10
    ) -> None:
        super().__init__(url)
        # Defaults only: a setting written in the URL wins.
        given = conninfo_to_dict(url)
        defaults: dict[str, str | int] = {"connect_timeout": connect_timeout, "application_name": "keel"}
        self._conninfo = make_conninfo(url, **{k: v for k, v in defaults.items() if k not in given})
        self._pool = _Pool(self._connect, max_connections, pool_timeout)

    def _connect(self) -> Connection:
        # autocommit: transaction() sends BEGIN itself, so a dead connection shows up before the caller's code.
        conn = psycopg.connect(self._conninfo, autocommit=True)
        conn.adapters.register_loader("jsonb", TextLoader)
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        conn = self._begin()
        try:
            with conn.cursor() as cur:
                yield cur
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        finally:
            self._pool.put(conn)

    def _begin(self) -> Connection:
        """A connection inside BEGIN; a pooled one found dead is replaced by a new one, once."""
        try:
            return self._begin_on(self._pool.get())
        except psycopg.OperationalError:
            return self._begin_on(self._pool.get(fresh=True))

    def _begin_on(self, conn: Connection) -> Connection:
        try:
            conn.execute("BEGIN")
        except BaseException:
            self._pool.put(conn)
            raise
        return conn

    def close(self) -> None:
        self._pool.close()

    # --- dialect --------------------------------------------------------------

    def json_param(self, value: str | None) -> Any:
        # The text is already JSON: pass it through as jsonb instead of decoding and re-encoding it.
        return None if value is None else Jsonb(value, dumps=_as_is)

    def _text(self, column: str) -> str:
        return f"COALESCE({column}::text, '')"

    def _sql(self, sql: str) -> str:
        """`?` becomes `%s` outside quoted literals (stats() groups unknown models as '?'); `%` is escaped."""
        parts = _QUOTED.split(sql.replace("%", "%%"))
        return "".join(part if i % 2 else part.replace("?", "%s") for i, part in enumerate(parts))

    def _lock_migrations(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))


def _as_is(text: Any) -> str:
    return str(text)


def _rollback(conn: Connection) -> None:
    if conn.closed:
        return
    try:
        conn.execute("ROLLBACK")
    except psycopg.Error:
        conn.close()
