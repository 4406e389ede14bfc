"""Who is calling: virtual keys, the admin key, and the open localhost mode.

Every request is authenticated by `Authorization: Bearer <key>`:

- the admin key (from the environment variable named by `[server] admin_key_env`)
  may call everything, the admin API and the dashboard's API included;
- a virtual key (`keel keys create`) may call the model API, within its models,
  limits and budget; its name is what the trace, limits and budget are charged to.

With no admin key and no active virtual key, keel runs open: it answers model
calls (`/v1/...`) made directly on this machine, and nothing that needs the admin
key (the admin API, the dashboard's data, `/metrics`): a relay on the same machine
(a plain TCP forwarder, a proxy, a browser page) is indistinguishable from a local
tool, so the open mode grants nothing it would regret granting to one. Keys created or
revoked by another process (`keel keys ...`, another replica's admin API) are seen within
`[server] key_refresh_s` (0.5 s): every change bumps a revision counter in the store, which each
replica polls (one indexed row) and reloads its keys when it moved. A key not yet seen is looked
up at once.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import re
import time
from dataclasses import dataclass

from fastapi import Request

from keel.errors import Forbidden, StoreUnavailable, Unauthorized
from keel.gateway import Gateway
from keel.keys import KeyRecord, hash_key, key_by_hash, keys_by_hash, keys_revision
from keel.store import Store

__all__ = [
    "Caller", "KeyRing", "Presented", "caller", "is_loopback",
    "is_proxy_header", "require_admin",
]  # fmt: skip

log = logging.getLogger("keel.server")

MAX_UNKNOWN = 100_000  # unknown keys remembered until the next reload (a bound against floods)
FULL_RELOAD_S = 60.0  # keys are reloaded this often even if the revision did not move (a change by hand)


@dataclass(frozen=True)
class Caller:
    key: str | None  # the virtual key's name, what spans are attributed to; None for admin and open mode
    admin: bool = False


OPEN = Caller(None)  # the open mode: model calls only, never what needs the admin key
ADMIN = Caller(None, admin=True)


def is_loopback(address: str | None) -> bool:
    try:
        return ipaddress.ip_address(address or "").is_loopback
    except ValueError:
        return False


LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
# A Host is a name and an optional port, nothing else: "127.0.0.1:evil.com" or "localhost:80:80" is malformed.
_HOST = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[^\[\]:/@\s]+)(?::[0-9]{1,5})?")
_ORIGIN = re.compile(r"https?://(?P<host>[^/]+)/?")


def is_local_name(host_header: str | None) -> bool:
    """A Host header naming this machine ("localhost:8000", "[::1]"), not a domain that merely
    resolves here (DNS rebinding would let any web page call the open server); a malformed one is not."""
    match = _HOST.fullmatch(host_header or "")
    return match is not None and match["name"].lower() in LOCAL_NAMES


def is_local_origin(origin: str | None) -> bool:
    """An Origin header ("http://127.0.0.1:8000") of a page served from this machine."""
    match = _ORIGIN.fullmatch(origin or "")
    return match is not None and is_local_name(match["host"])


# Headers that a proxy, a CDN or a relay adds to say who the client really is or that it stood in
# between: X-Forwarded-*, Forwarded, X-Original-Forwarded-For, X-Real-IP, CF-Connecting-IP,
# True-Client-IP, X-Client-IP, Fastly-Client-IP, X-Cluster-Client-IP, Via, ... A request with any of
# them did not come straight from a local tool.
_PROXY_HEADER = re.compile(r"forwarded|real-?ip|client-?ip|connecting-?ip|originating-?ip|remote-?addr|^via$")


def is_proxy_header(name: str) -> bool:
    return _PROXY_HEADER.search(name.lower()) is not None


@dataclass(frozen=True)
class Presented:
    """What authentication looks at in a request."""

    authorization: str | None = None
    client: str | None = None  # the peer's address
    host: str | None = None  # the Host header
    origin: str | None = None  # the Origin header, sent by browsers
    forwarded: bool = False  # a proxy header (see `is_proxy_header`): something stands in front


def local_request(r: Presented) -> bool:
    """From this machine, directly: a loopback peer, a local Host, no proxy, no foreign web page."""
    return (
        is_loopback(r.client)
        and not r.forwarded
        and is_local_name(r.host)
        # "null" is not local: a sandboxed iframe or a data: page of any web site sends it
        and (r.origin is None or is_local_origin(r.origin))
    )


def bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class KeyRing:
    """The virtual keys, cached from the store and registered with the gateway's limits."""

    def __init__(self, gateway: Gateway, *, admin_env: str, refresh_s: float) -> None:
        self.gateway = gateway
        # read once, here: a server started before the variable was exported has no admin key (the errors say so)
        self.admin_env = admin_env
        admin = os.environ.get(admin_env, "").strip()
        self._admin_hash = hash_key(admin) if admin else None
        self.refresh_s = refresh_s
        self._by_hash: dict[str, KeyRecord] = {}
        self._registered: set[str] = set()
        self._unknown: set[str] = set()  # hashes looked up and not found since the last reload
        self._loading = asyncio.Lock()  # reloads apply in order: a late, older read never undoes a newer one
        self._revision = -1  # the keys' revision in the store when they were last loaded
        self._loaded_at = 0.0

    @property
    def has_admin(self) -> bool:
        return self._admin_hash is not None

    @property
    def open(self) -> bool:
        """No admin key and no active key: direct local callers may call models, nobody may administer."""
        return self._admin_hash is None and not self._registered

    async def load(self) -> None:
        async with self._loading:
            store = self.gateway.store
            revision, records = await asyncio.to_thread(_read_keys, store) if store is not None else (0, {})
            self._apply(records)
            self._revision, self._loaded_at = revision, time.monotonic()

    async def refresh(self) -> None:
        """Reload the keys if they changed in the store since they were loaded (one row read)."""
        store = self.gateway.store
        if store is None:
            return
        stale = time.monotonic() - self._loaded_at > FULL_RELOAD_S
        if stale or await asyncio.to_thread(keys_revision, store) != self._revision:
            await self.load()

    def _apply(self, records: dict[str, KeyRecord]) -> None:
        self._by_hash = records
        self._unknown = set()
        active = {r.name: r for r in records.values() if r.active}
        for name in self._registered - active.keys():
            self.gateway.set_key(name, self.gateway.config.keys.get(name))  # back to keel.toml's, if any
        for name, record in active.items():
            self.gateway.set_key(name, record.limits)
        self._registered = set(active)

    async def run(self) -> None:
        """Check every `refresh_s` for keys revoked or created by another process, and reload them."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # the store is down: keep the keys we have, try again
                log.warning("could not reload keys from the store", exc_info=True)

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        """A cached key, or one created since the last reload (one indexed query)."""
        record = self._by_hash.get(key_hash)
        store = self.gateway.store
        if record is None and store is not None and key_hash not in self._unknown:
            try:
                record = await asyncio.to_thread(key_by_hash, store, key_hash)
            except Exception as exc:
                raise StoreUnavailable("cannot check the key: the store does not answer") from exc
            if record is None:
                if len(self._unknown) >= MAX_UNKNOWN:
                    self._unknown.clear()
                self._unknown.add(key_hash)
            elif record.active:
                self._by_hash[key_hash] = record
                self._registered.add(record.name)
                self.gateway.set_key(record.name, record.limits)
        return record

    async def authenticate(self, request: Presented) -> Caller:
        """The caller of a request, or Unauthorized with the reason."""
        token = bearer(request.authorization)
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
            if local_request(request):
                return OPEN
            raise Unauthorized(
                "keel has no keys configured, so it answers only requests made on this machine to "
                "localhost or 127.0.0.1 (not through a proxy); create a key with `keel keys create --name NAME` "
                "or set the admin key"
            )
        if token is None:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        raise Unauthorized(f"invalid API key {token[:8]}...: not a key of this server; {self.admin_hint()}")

    def admin_hint(self) -> str:
        """How this server reads its admin key: the step a new user misses is exporting it before the start."""
        env = self.admin_env
        if self._admin_hash is None:
            return (
                f"this server has no admin key: it reads ${env} once, when it starts, from its own environment;"
                f" export {env} and restart `keel serve`"
            )
        return f"the admin key is read from ${env} once, when the server starts: restart it after changing the key"


def _read_keys(store: Store) -> tuple[int, dict[str, KeyRecord]]:
    """The keys and their revision, the revision read first: a change in between is seen at the next poll."""
    return keys_revision(store), keys_by_hash(store)


def caller(request: Request) -> Caller:
    """The authenticated caller that the auth middleware put on the request."""
    found = getattr(request.state, "caller", None)
    if not isinstance(found, Caller):
        raise Unauthorized("not authenticated")
    return found


async def require_admin(request: Request) -> Caller:
    """FastAPI dependency for the admin API, the dashboard's API and /metrics."""
    who = caller(request)
    if who is OPEN:
        env = request.app.state.settings.admin_key_env
        raise Unauthorized(
            f"this endpoint needs the admin key, and keel runs without one: set ${env} and restart "
            "(with no keys, keel answers only model calls made on this machine)"
        )
    if not who.admin:
        keyring: KeyRing = request.app.state.keyring
        raise Forbidden(f"this endpoint needs the admin key, not the virtual key {who.key!r}; {keyring.admin_hint()}")
    return who
