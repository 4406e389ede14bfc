"""Who is calling: virtual keys, the admin key, and the open localhost mode.

Every request is authenticated by `Authorization: Bearer <key>`:

- the admin key (from the environment variable named by `[server] admin_key_env`)
  may call everything, the admin API and the dashboard's API included;
- a virtual key (`keel keys create`) may call the model API, within its models,
  limits and budget; its name is what the trace, limits and budget are charged to.

With no admin key and no active virtual key, keel runs open but answers only
clients on the loopback interface, and says so at start. Keys created or
revoked by another process (`keel keys ...`) are seen within
`[server] key_refresh_s`; a key not yet seen is looked up at once.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass

from fastapi import Request

from keel.errors import KeelError
from keel.gateway import Gateway
from keel.keys import KeyRecord, hash_key, key_by_hash, keys_by_hash

__all__ = ["Caller", "Forbidden", "KeyRing", "Unauthorized", "caller", "is_loopback", "require_admin"]

log = logging.getLogger("keel.server")

MAX_UNKNOWN = 100_000  # unknown keys remembered until the next reload (a bound against floods)


class Unauthorized(KeelError):
    """A missing, unknown or revoked key."""

    http_status = 401
    code = "invalid_api_key"


class Forbidden(KeelError):
    """A key that may not use this endpoint."""

    http_status = 403
    code = "forbidden"


@dataclass(frozen=True)
class Caller:
    key: str | None  # the virtual key's name, what spans are attributed to; None for admin and open mode
    admin: bool = False


OPEN = Caller(None, admin=True)
ADMIN = Caller(None, admin=True)


def is_loopback(host: str | None) -> bool:
    if host in ("testclient", "localhost"):  # starlette's in-process test client
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class KeyRing:
    """The virtual keys, cached from the store and registered with the gateway's limits."""

    def __init__(self, gateway: Gateway, *, admin_env: str, refresh_s: float) -> None:
        self.gateway = gateway
        admin = os.environ.get(admin_env, "").strip()
        self._admin_hash = hash_key(admin) if admin else None
        self.refresh_s = refresh_s
        self._by_hash: dict[str, KeyRecord] = {}
        self._registered: set[str] = set()
        self._unknown: set[str] = set()  # hashes looked up and not found since the last reload

    @property
    def has_admin(self) -> bool:
        return self._admin_hash is not None

    @property
    def open(self) -> bool:
        """No admin key and no active key: anyone on localhost may call, nobody else."""
        return self._admin_hash is None and not self._registered

    async def load(self) -> None:
        store = self.gateway.store
        records = await asyncio.to_thread(keys_by_hash, store) if store is not None else {}
        self._by_hash = records
        self._unknown = set()
        active = {r.name: r for r in records.values() if r.active}
        for name in self._registered - active.keys():
            self.gateway.set_key(name, self.gateway.config.keys.get(name))  # back to keel.toml's, if any
        for name, record in active.items():
            self.gateway.set_key(name, record.limits)
        self._registered = set(active)

    async def run(self) -> None:
        """Reload every `refresh_s` (keys revoked or created by `keel keys` in another process)."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.load()
            except Exception:  # the store is down: keep the keys we have, try again
                log.warning("could not reload keys from the store", exc_info=True)

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        """A cached key, or one created since the last reload (one indexed query)."""
        record = self._by_hash.get(key_hash)
        store = self.gateway.store
        if record is None and store is not None and key_hash not in self._unknown:
            record = await asyncio.to_thread(key_by_hash, store, key_hash)
            if record is None:
                if len(self._unknown) >= MAX_UNKNOWN:
                    self._unknown.clear()
                self._unknown.add(key_hash)
            elif record.active:
                self._by_hash[key_hash] = record
                self._registered.add(record.name)
                self.gateway.set_key(record.name, record.limits)
        return record

    async def authenticate(self, authorization: str | None, client_host: str | None) -> Caller:
        """The caller of a request, or Unauthorized with the reason."""
        token = bearer(authorization)
        if token is not None:
            key_hash = hash_key(token)
            if self._admin_hash is not None and hmac.compare_digest(key_hash, self._admin_hash):
                return ADMIN
            record = await self._lookup(key_hash)
            if record is not None and record.active:
                return Caller(record.name)
            if record is not None:
                raise Unauthorized(f"the key {record.prefix}... ({record.name}) was revoked")
        if self.open:
            if is_loopback(client_host):
                return OPEN
            raise Unauthorized(
                "keel has no keys configured, so it answers only on localhost; "
                "create one with `keel keys create --name NAME` or set the admin key"
            )
        if token is None:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        raise Unauthorized(f"invalid API key {token[:8]}...")


def caller(request: Request) -> Caller:
    """The authenticated caller that the auth middleware put on the request."""
    found = getattr(request.state, "caller", None)
    if not isinstance(found, Caller):
        raise Unauthorized("not authenticated")
    return found


async def require_admin(request: Request) -> Caller:
    """FastAPI dependency for the admin API and the dashboard's API."""
    who = caller(request)
    if not who.admin:
        raise Forbidden("this endpoint needs the admin key")
    return who
