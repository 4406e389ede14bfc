"""Collection scopes on keys: which RAG collections a key may read and write, on every RAG route.

A key limited to some models once listed every collection and read documents through a `bm25`
search (which calls no model). Keys now carry `collections` (read; None: all) and
`collections_write` (ingest, delete; None: none), stored in both backends and enforced on listing,
search (every retriever), ask, ingest and delete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from helpers import rag_gateway, spans
from keel import Gateway
from keel.cli.app import app as cli
from keel.config import KeyConfig
from keel.keys import create_key, key_by_hash, keys_by_hash, list_keys
from keel.store import Store
from keel.types import ChatRequest
from serving import Server

ADMIN = "admin-secret-for-scope-tests"
DOCS = [{"id": "d1", "text": "The vault code is kept in the blue folder on the second shelf."}]


def answer(request: ChatRequest) -> str:
    return "It is in the blue folder [1]."


# --- stored ----------------------------------------------------------------------------------


def test_scopes_are_stored_and_read_back_on_both_backends(store: Store) -> None:
    assert "0004_key_collections" in store.applied_migrations()
    limits = KeyConfig(models=("t",), collections=("public", "faq"), collections_write=("faq",))
    _, record = create_key(store, "reader", limits)
    _, everything = create_key(store, "all")
    [listed_reader, listed_all] = list_keys(store)
    assert listed_reader.limits == limits and listed_all.limits == KeyConfig()
    assert listed_reader.to_json()["collections"] == ["public", "faq"]
    assert listed_reader.to_json()["collections_write"] == ["faq"]
    assert listed_all.to_json()["collections"] is None and listed_all.to_json()["collections_write"] is None
    by_hash = keys_by_hash(store)
    assert {r.name: r.limits for r in by_hash.values()} == {"reader": limits, "all": KeyConfig()}
    found = key_by_hash(store, next(h for h, r in by_hash.items() if r.name == "reader"))
    assert found is not None and found.limits.collections == ("public", "faq")
    assert record.limits == limits and everything.limits.collections is None


@pytest.mark.parametrize("names", [("bad name",), ("",), ("x" * 65,), ("-lead",)])
def test_bad_collection_names_are_refused(store: Store, names: tuple[str, ...]) -> None:
    with pytest.raises(Exception, match="is not a collection name"):
        create_key(store, "k", KeyConfig(collections=names))
    with pytest.raises(Exception, match="is not a collection name"):
        create_key(store, "k", KeyConfig(collections_write=names))


# --- enforced on every route -----------------------------------------------------------------


@pytest.fixture
def gw(tmp_path: Path, store_url: str) -> Iterator[Gateway]:
    g = rag_gateway(tmp_path, store_url, answer)
    yield g
    g.close()


@pytest.fixture
def server(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    running = Server(gw)
    admin = {"authorization": f"Bearer {ADMIN}"}
    for name in ("public", "secret"):
        added = httpx.post(
            f"{running.base}/v1/rag/{name}/documents", json={"documents": DOCS}, headers=admin, timeout=60
        )
        assert added.status_code == 200, added.text
    yield running
    running.stop()


def as_key(server: Server, gw: Gateway, name: str, limits: KeyConfig) -> httpx.Client:
    assert gw.store is not None
    secret, _ = create_key(gw.store, name, limits)
    return httpx.Client(base_url=server.base, timeout=60, headers={"authorization": f"Bearer {secret}"})


def bm25(client: httpx.Client, collection: str) -> httpx.Response:
    return client.post(f"/v1/rag/{collection}/search", json={"query": "vault code", "retriever": "bm25"})


def test_a_scoped_key_reads_and_writes_only_its_collections(server: Server, gw: Gateway) -> None:
    limits = KeyConfig(models=("answers", "bge-small"), collections=("public", "new"), collections_write=("new",))
    with as_key(server, gw, "scoped", limits) as http:
        assert [c["name"] for c in http.get("/v1/rag/collections").json()["data"]] == ["public"]
        assert bm25(http, "public").json()["hits"][0]["doc_id"] == "d1"
        refused = bm25(http, "secret")  # bm25 calls no model: only the collection scope stops it
        assert refused.status_code == 403, refused.text
        assert "may not read collection 'secret'" in refused.json()["error"]["message"]
        assert "blue folder" not in refused.text
        assert bm25(http, "missing").status_code == 403  # outside the scope: 403, existing or not
        for retriever in ("dense", "hybrid"):
            search = {"query": "vault", "retriever": retriever}
            assert http.post("/v1/rag/secret/search", json=search).status_code == 403
        ask = {"question": "Where is the vault code?", "retriever": "bm25", "mode": "extractive"}
        assert http.post("/v1/rag/secret/ask", json=ask).status_code == 403
        assert http.post("/v1/rag/public/ask", json=ask).status_code == 200
        for collection in ("public", "secret"):  # read scope is not write scope
            assert http.post(f"/v1/rag/{collection}/documents", json={"documents": DOCS}).status_code == 403
            assert http.delete(f"/v1/rag/{collection}").status_code == 403
        assert http.post("/v1/rag/new/documents", json={"documents": DOCS}).json()["added"] == 1
        assert sorted(c["name"] for c in http.get("/v1/rag/collections").json()["data"]) == ["new", "public"]
        assert http.delete("/v1/rag/new").json()["deleted"] is True


def test_a_write_only_key_lists_what_it_may_write(server: Server, gw: Gateway) -> None:
    with as_key(
        server, gw, "ingester", KeyConfig(models=("answers",), collections=(), collections_write=("secret",))
    ) as http:
        assert [c["name"] for c in http.get("/v1/rag/collections").json()["data"]] == ["secret"]
        assert bm25(http, "secret").status_code == 403
        assert http.post("/v1/rag/secret/documents", json={"documents": DOCS}).json()["unchanged"] == 1


def test_a_key_ingests_under_its_own_model_scope(server: Server, gw: Gateway) -> None:
    """Writing a collection embeds the documents: with the key's models, limits and attribution, so a
    key allowed one chat model cannot spend on an embedding model (its own choice, even) by ingesting."""
    fresh = [{"id": "n1", "text": "A document nobody has embedded before, about otters."}]
    with as_key(server, gw, "writer", KeyConfig(models=("answers",), collections_write=("fresh",))) as http:
        refused = http.post("/v1/rag/fresh/documents", json={"documents": fresh})
        assert refused.status_code == 403, refused.text
        assert "bge-small" in refused.json()["error"]["message"]
    with as_key(server, gw, "embedder", KeyConfig(models=("bge-small",), collections_write=("fresh",))) as http:
        added = http.post("/v1/rag/fresh/documents", json={"documents": fresh})
        assert added.status_code == 200 and added.json()["added"] == 1, added.text
    keys = {s.attributes.get("keel.api_key") for s in spans(gw) if s.name.startswith("embeddings")}
    assert "embedder" in keys


def test_an_unscoped_key_reads_everything_and_writes_nothing(server: Server, gw: Gateway) -> None:
    with as_key(server, gw, "reader", KeyConfig()) as http:
        assert sorted(c["name"] for c in http.get("/v1/rag/collections").json()["data"]) == ["public", "secret"]
        assert bm25(http, "secret").status_code == 200
        assert http.post("/v1/rag/secret/documents", json={"documents": DOCS}).status_code == 403
        assert http.delete("/v1/rag/secret").status_code == 403


def test_the_admin_api_takes_and_shows_scopes(server: Server) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    body = {"name": "team", "collections": ["public"], "collections_write": []}
    created = httpx.post(f"{server.base}/admin/keys", json=body, headers=admin)
    assert created.status_code == 201, created.text
    assert (created.json()["collections"], created.json()["collections_write"]) == (["public"], [])
    [listed] = httpx.get(f"{server.base}/admin/keys", headers=admin).json()["data"]
    assert (listed["collections"], listed["collections_write"]) == (["public"], [])
    with httpx.Client(base_url=server.base, headers={"authorization": f"Bearer {created.json()['key']}"}) as http:
        assert [c["name"] for c in http.get("/v1/rag/collections").json()["data"]] == ["public"]
        assert bm25(http, "secret").status_code == 403
    bad = httpx.post(f"{server.base}/admin/keys", json={"name": "x", "collections": ["no spaces"]}, headers=admin)
    assert bad.status_code == 400 and "is not a collection name" in bad.json()["error"]["message"]
    bad = httpx.post(f"{server.base}/admin/keys", json={"name": "x", "collections_write": "public"}, headers=admin)
    assert bad.status_code == 400


def test_the_cli_creates_and_lists_scopes() -> None:
    runner = CliRunner()
    made = runner.invoke(
        cli, ["keys", "create", "--name", "team", "--collections", "docs,faq", "--collections-write", "faq"]
    )
    assert made.exit_code == 0, made.output
    assert "reads docs,faq" in made.output and "writes faq" in made.output
    [key] = json.loads(runner.invoke(cli, ["keys", "list", "--json"]).output)
    assert (key["collections"], key["collections_write"]) == (["docs", "faq"], ["faq"])
    refused = runner.invoke(cli, ["keys", "create", "--name", "x", "--collections", "bad name"])
    assert refused.exit_code == 2 and "is not a collection name" in refused.output
