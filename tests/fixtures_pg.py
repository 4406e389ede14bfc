"""PostgreSQL for tests: one real server per session, one empty database per test.

pgserver ships PostgreSQL 16 with pgvector in a wheel, so `make test` needs
nothing else on the machine. PostgreSQL refuses to run as root; when the tests
run as root (CI containers, this sandbox) pgserver handles it itself: it
creates a `pgserver` system user with `useradd`, chowns the data directory to
it, runs initdb and pg_ctl as that user, and widens the parents' permissions so
that user can reach the directory. The data directory therefore lives in its
own temporary directory rather than under pytest's basetemp, which pytest
keeps private (0700) and would lock the server out of again.

Set KEEL_TEST_POSTGRES_URL to a superuser URL to use an existing server instead.

The `store` fixture runs a test once per backend: `-m "not postgres"` skips
the PostgreSQL half.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from keel.store import Store, open_store

__all__ = ["pg_database_url", "pg_databases", "pg_url", "store", "store_url", "unmigrated_store"]

# A throwaway server need not survive a power cut: skipping fsync makes CREATE DATABASE and commits cheap.
_TEST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """Superuser URL of the `postgres` database on a PostgreSQL server for this session."""
    external = os.environ.get("KEEL_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    base = Path(tempfile.mkdtemp(prefix="keel-pg-"))
    server = _start_server(base / "pgdata")
    try:
        url: str = server.get_uri()
        _configure_for_tests(url)
        yield url
    finally:
        server.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def _start_server(pgdata: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR is not set
        from pgserver.postgres_server import get_server
    return get_server(pgdata, cleanup_mode="delete")


def _configure_for_tests(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        for name, value in _TEST_SETTINGS.items():
            admin.execute(f"ALTER SYSTEM SET {name} = {value}")
        admin.execute("SELECT pg_reload_conf()")


class PgDatabases:
    """Empty databases for tests, recycled.

    CREATE DATABASE copies a template (0.1 to 0.7 s on two busy cores); emptying
    a used database by dropping its schemas takes milliseconds. Only what lives
    in schemas is reset (tables, types, functions, extensions), which is all
    the store creates.
    """

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self._free: list[str] = []

    def url(self, name: str) -> str:
        return urlsplit(self.admin_url)._replace(path=f"/{name}").geturl()

    def take(self) -> str:
        if self._free:
            return self._free.pop()
        name = f"keel_test_{secrets.token_hex(6)}"
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def give_back(self, name: str) -> None:
        try:
            self._empty(name)
        except psycopg.Error:
            self._drop(name)
        else:
            self._free.append(name)

    def close(self) -> None:
        while self._free:
            self._drop(self._free.pop())

    def _empty(self, name: str) -> None:
        # Connections the test left open would see the reset; end them first.
        self._admin(
            sql.SQL(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                " WHERE datname = {} AND pid <> pg_backend_pid()"
            ).format(sql.Literal(name))
        )
        with psycopg.connect(self.url(name), autocommit=True) as db:
            query = "SELECT nspname FROM pg_namespace WHERE nspname !~ '^pg_' AND nspname <> 'information_schema'"
            for (schema,) in db.execute(query).fetchall():
                db.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
            db.execute("CREATE SCHEMA public AUTHORIZATION pg_database_owner")  # as PostgreSQL 15+ creates it
            db.execute("GRANT USAGE ON SCHEMA public TO PUBLIC")

    def _drop(self, name: str) -> None:
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def _admin(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(statement)


@pytest.fixture(scope="session")
def pg_databases(pg_url: str) -> Iterator[PgDatabases]:
    databases = PgDatabases(pg_url)
    yield databases
    databases.close()


@pytest.fixture
def pg_database_url(pg_databases: PgDatabases) -> Iterator[str]:
    """URL of an empty database (no tables, no extensions) for this test alone."""
    name = pg_databases.take()
    yield pg_databases.url(name)
    pg_databases.give_back(name)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where an empty store of each backend lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "store.db")
    url: str = request.getfixturevalue("pg_database_url")
    return url


@pytest.fixture
def unmigrated_store(store_url: str) -> Iterator[Store]:
    """A store of each backend with no tables yet."""
    opened = open_store(store_url, migrate=False)
    yield opened
    opened.close()


@pytest.fixture
def store(unmigrated_store: Store) -> Store:
    """A migrated, empty store of each backend."""
    unmigrated_store.migrate()
    return unmigrated_store
