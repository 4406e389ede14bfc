"""PostgreSQL for tests: one real server per session, one fresh database per test.

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

import pytest

from keel.store import Store, open_store

__all__ = ["pg_database_url", "pg_url", "store", "store_url", "unmigrated_store"]

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
        import pgserver
    return pgserver.get_server(pgdata, cleanup_mode="delete")


def _configure_for_tests(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as admin:
        for name, value in _TEST_SETTINGS.items():
            admin.execute(f"ALTER SYSTEM SET {name} = {value}")
        admin.execute("SELECT pg_reload_conf()")


@pytest.fixture
def pg_database_url(pg_url: str) -> Iterator[str]:
    """URL of a new, empty database, dropped after the test."""
    import psycopg
    from psycopg import sql

    name = f"keel_test_{secrets.token_hex(6)}"
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield urlsplit(pg_url)._replace(path=f"/{name}").geturl()
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


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
