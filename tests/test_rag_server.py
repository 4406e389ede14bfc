"""RAG over HTTP, on a real keel server: documents in (admin), search, ask with citations, errors, traces.

The answer model is scripted to cite the source that holds the fact asked
about, so the assertions are about keel's citations, spans and statuses; the
embedding model is the real local one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import rag_gateway, spans
from keel import Gateway
from keel.config import KeyConfig
from keel.keys import create_key
from keel.types import ChatRequest
from serving import Server

ADMIN = "admin-secret-for-rag-tests"
DOCUMENTS = [
    {"id": "cats", "title": "Cats", "text": "Cats sleep for about fifteen hours a day and hunt at dawn and dusk.",
     "metadata": {"kind": "animal"}},
    {"id": "tides", "title": "Tides", "text": "Tides are caused by the gravitational pull of the moon and the sun.",
     "metadata": {"kind": "sea"}},
    {"id": "keys", "title": "Keys", "text": "To rotate a key, revoke it and then create a new one.",
     "metadata": {"kind": "ops"}},
]  # fmt: skip


def cites_tides(request: ChatRequest) -> str:
    prompt = request.messages[-1].content or ""
    number = next(m.group(1) for m in re.finditer(r"^\[(\d+)\] [^\n]*\n([^\n]*)", prompt, re.M) if "moon" in m.group(2))
    return f"Tides are caused by the pull of the moon and the sun [{number}]."


@pytest.fixture
def gw(tmp_path: Path, store_url: str) -> Iterator[Gateway]:
    g = rag_gateway(tmp_path, store_url, cites_tides)
    yield g
    g.close()


@pytest.fixture
def server(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    monkeypatch.setenv("KEEL_ADMIN_KEY", ADMIN)
    running = Server(gw)
    yield running
    running.stop()


@pytest.fixture
def http(server: Server, gw: Gateway) -> Iterator[httpx.Client]:
    """A client with a virtual key that may use the embedding and answer models (not the admin API)."""
    assert gw.store is not None
    secret, _ = create_key(gw.store, "app", KeyConfig(models=("bge-small", "answers")))
    with httpx.Client(base_url=server.base, timeout=60, headers={"authorization": f"Bearer {secret}"}) as client:
        yield client


def admin() -> dict[str, str]:
    return {"authorization": f"Bearer {ADMIN}"}


def ingest(http: httpx.Client) -> dict[str, object]:
    response = http.post("/v1/rag/facts/documents", json={"documents": DOCUMENTS}, headers=admin())
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_documents_in_then_listed_and_unchanged_ones_skipped(http: httpx.Client) -> None:
    first = ingest(http)
    assert (first["added"], first["updated"], first["unchanged"]) == (3, 0, 0)
    again = ingest(http)
    assert (again["added"], again["unchanged"]) == (0, 3)
    listed = http.get("/v1/rag/collections").json()["data"]
    assert [(c["name"], c["documents"]) for c in listed] == [("facts", 3)]
    assert listed[0]["chunks"] >= 3 and listed[0]["dimensions"] > 0


def test_search_returns_every_retrievers_scores_and_honours_filters(http: httpx.Client) -> None:
    ingest(http)
    body = http.post("/v1/rag/facts/search", json={"query": "what makes the tides?", "top_k": 3}).json()
    assert body["retriever"] == "hybrid" and body["hits"][0]["doc_id"] == "tides"
    top = body["hits"][0]
    assert top["bm25"] is not None and top["dense"] is not None and top["fused"] == top["score"]
    assert {"embed_ms", "bm25_ms", "dense_ms"} <= set(body["timings_ms"])
    only_ops = {"query": "what makes the tides?", "filter": {"kind": "ops"}}
    assert [h["doc_id"] for h in http.post("/v1/rag/facts/search", json=only_ops).json()["hits"]] == ["keys"]


def test_ask_answers_with_citations_to_exact_spans_in_one_trace(http: httpx.Client, gw: Gateway) -> None:
    ingest(http)
    response = http.post("/v1/rag/facts/ask", json={"question": "What causes the tides?", "mode": "generate"})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["kind"] == "generated" and answer["answer"].endswith("[1].")
    [citation] = answer["citations"]
    tides = DOCUMENTS[1]["text"]
    assert citation["doc_id"] == "tides"
    assert tides[citation["start"] : citation["end"]] in tides and citation["end"] > citation["start"]
    assert citation["quote"]["text"] in tides
    assert answer["sentences"][0]["supported"] is True
    names = {s.name.split()[0] for s in spans(gw, trace_id=answer["trace_id"])}
    assert {"rag.ask", "rag.retrieve", "chat", "rag.ground"} <= names


def test_a_question_the_documents_do_not_answer_abstains(http: httpx.Client) -> None:
    ingest(http)
    answer = http.post("/v1/rag/facts/ask", json={"question": "Who won the 1998 football world cup final?"}).json()
    assert answer["kind"] == "abstained" and answer["citations"] == []
    assert "support" in answer["reason"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/rag/nowhere/search", {"query": "tides"}, 404, "unknown collection 'nowhere'"),
        ("/v1/rag/facts/ask", {"question": ""}, 400, "question"),
        ("/v1/rag/facts/search", {"query": "tides", "top_k": 0}, 400, "top_k"),
        ("/v1/rag/facts/search", {"query": "tides", "surprise": 1}, 400, "surprise"),
        ("/v1/rag/facts/search", {"query": "tides", "filter": {"kind": {"$near": 1}}}, 400, "$near"),
        ("/v1/rag/facts/search", {"query": "tides", "retriever": "magic"}, 400, "retriever"),
        ("/v1/rag/facts/ask", {"question": "tides " * 3000, "context_tokens": 2000}, 400, "context budget"),
        ("/v1/rag/bad%20name/search", {"query": "tides"}, 400, "collection"),
    ],
)
def test_bad_requests_get_a_specific_error(
    http: httpx.Client, path: str, body: dict[str, object], status: int, needle: str
) -> None:
    ingest(http)
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert needle in response.json()["error"]["message"]


def test_writing_and_dropping_need_the_admin_key(http: httpx.Client, server: Server) -> None:
    refused = http.post("/v1/rag/facts/documents", json={"documents": DOCUMENTS})
    assert refused.status_code == 403, refused.text
    anonymous = httpx.post(f"{server.base}/v1/rag/facts/search", json={"query": "tides"})
    assert anonymous.status_code == 401
    assert http.get("/v1/rag/collections").json()["data"] == []
    ingest(http)
    assert http.delete("/v1/rag/facts").status_code == 403
    assert http.delete("/v1/rag/facts", headers=admin()).json()["deleted"] is True
    assert http.post("/v1/rag/facts/search", json={"query": "tides"}).status_code == 404
