"""The admin API: virtual keys. Every route needs the admin key (or the open localhost mode).

`POST /admin/keys` answers the new key once, like `keel keys create`;
`GET /admin/keys` lists them (never the keys themselves);
`DELETE /admin/keys/{name}` revokes one. Changes apply to the running
server at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from keel.config import KeyConfig
from keel.errors import InputError
from keel.keys import create_key, list_keys, revoke_key
from keel.server.auth import KeyRing, require_admin
from keel.server.bodies import OFF_LOOP_BYTES, JSONBodyRoute, parse_json
from keel.store import Store

__all__ = ["CreateKey", "router"]

log = logging.getLogger("keel.server")


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    rpm: int | None = Field(default=None, gt=0, le=2**31 - 1)
    tpm: int | None = Field(default=None, gt=0, le=2**31 - 1)
    daily_budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    monthly_budget_usd: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    models: list[str] | None = Field(default=None, max_length=256)
    collections: list[str] | None = Field(default=None, max_length=1000)  # RAG collections it may read; None: all
    collections_write: list[str] | None = Field(default=None, max_length=1000)  # ... may write; None: none
    metadata: dict[str, str] | None = None


def _tuple(names: list[str] | None) -> tuple[str, ...] | None:
    return tuple(names) if names is not None else None


async def _create_body(request: Request) -> CreateKey:
    """The body as JSON whatever its Content-Type: `curl -d '{...}'` sends form-urlencoded unless told
    otherwise, and an admin call is not worth a confusing refusal. Parsed and checked as every JSON body is."""
    raw = await request.body()
    data = (
        await asyncio.to_thread(parse_json, raw, CreateKey)
        if len(raw) >= OFF_LOOP_BYTES
        else parse_json(raw, CreateKey)
    )
    try:
        return CreateKey.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(), body=data) from None


#: the request body in the OpenAPI schema (the route reads it itself)
_JSON_BODY: dict[str, Any] = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": CreateKey.model_json_schema()}}}
}


def _store(request: Request) -> Store:
    store: Store | None = request.app.state.gateway.store
    if store is None:
        raise InputError("keys need a store; this server runs without one")
    return store


async def _reload(request: Request) -> None:
    """Apply a change to the running server now; if the store hiccups, the periodic reload will."""
    keyring: KeyRing = request.app.state.keyring
    try:
        await keyring.load()
    except Exception:
        log.warning("could not reload keys after a change; the next periodic reload applies it", exc_info=True)


def router() -> APIRouter:
    api = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], tags=["admin"], route_class=JSONBodyRoute)

    @api.get("/keys")
    async def keys(request: Request, include_revoked: bool = False) -> dict[str, Any]:
        records = await asyncio.to_thread(list_keys, _store(request), include_revoked=include_revoked)
        return {"object": "list", "data": [r.to_json() for r in records]}

    @api.post("/keys", status_code=201, openapi_extra=_JSON_BODY)
    async def create(request: Request, body: Annotated[CreateKey, Depends(_create_body)]) -> dict[str, Any]:
        gateway = request.app.state.gateway
        for model in body.models or ():
            if gateway.config.resolve_name(model) is None and model not in gateway.model_names:
                raise InputError(f"unknown model {model!r} in models")
        limits = KeyConfig(
            rpm=body.rpm, tpm=body.tpm, daily_budget_usd=body.daily_budget_usd,
            monthly_budget_usd=body.monthly_budget_usd, models=_tuple(body.models),
            collections=_tuple(body.collections), collections_write=_tuple(body.collections_write),
        )  # fmt: skip
        secret, record = await asyncio.to_thread(create_key, _store(request), body.name, limits, body.metadata)
        await _reload(request)
        return {**record.to_json(), "key": secret}

    @api.delete("/keys/{name}")
    async def revoke(name: str, request: Request) -> dict[str, Any]:
        record = await asyncio.to_thread(revoke_key, _store(request), name)
        await _reload(request)
        return record.to_json()

    return api
