"""RAG end to end through the library, on both store backends: ingest, search, ask, traces.

The embedding model is the real local bge-small-en-v1.5; answers come from
scripted models (FunctionModel), so every assertion about citations and
grounding is about keel's logic, not a model's mood.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from helpers import gateway, spans
from keel import FunctionModel, Gateway
from keel.errors import ConfigError, InputError
from keel.rag import (
    RAG,
    Document,
    InvalidFilter,
    QueryTooLong,
    SettingsMismatch,
    StoreUnavailable,
    UnknownCollection,
)
from keel.rag.answer import LOCAL_ANSWER_MAX_TOKENS, LOCAL_CONTEXT_TOKENS, NOT_IN_DOCUMENTS
from keel.text.documents import storable
from keel.types import ChatRequest
from rag_files import write_corpus

FACTS = [
    ("keys", "Keys", "To rotate a key, revoke it with keel keys revoke and create a new one with keel keys create."),
    ("budgets", "Budgets", "A budget caps what a key may spend in USD per day or per month."),
    ("cats", "Cats", "Cats sleep for about fifteen hours a day and hunt at dawn and dusk."),
    ("tides", "Tides", "Tides are caused by the gravitational pull of the moon and the sun on the oceans."),
]


def fact_documents() -> list[Document]:
    return [Document(i, text, title=title, source="facts", metadata={"topic": i}) for i, title, text in FACTS]


def last_user_text(request: ChatRequest) -> str:
    return request.messages[-1].content or ""


def source_number(request: ChatRequest, phrase: str) -> int:
    """The [n] of the prompt's source that contains `phrase`."""
    for match in re.finditer(r"^\[(\d+)\] [^\n]*\n([^\n]*)", last_user_text(request), re.MULTILINE):
        if phrase in match.group(2):
            return int(match.group(1))
    raise AssertionError(f"no source with {phrase!r} in the prompt")


def cite(phrase: str, sentence: str) -> FunctionModel:
    """A model that answers `sentence`, citing the source that contains `phrase`."""
    return FunctionModel(lambda r: f"{sentence} [{source_number(r, phrase)}]")


@pytest.fixture
def rag_gateway(tmp_path: Path, store_url: str) -> Iterator[Gateway]:
    gw = gateway(tmp_path, "[rag]\nembed_batch = 4\n", store=store_url)
    yield gw
    gw.close()


@pytest.fixture
def rag(rag_gateway: Gateway) -> Iterator[RAG]:
    engine = RAG(rag_gateway)
    yield engine
    engine.close()


@pytest.fixture
def facts(rag: RAG) -> RAG:
    rag.ingest_sync(fact_documents(), "facts")
    return rag


# --- ingestion -----------------------------------------------------------------------------------


def test_folder_ingest_is_incremental(rag: RAG, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "docs")
    first = rag.ingest_sync(corpus, "docs")
    assert (first.added, first.updated, first.unchanged, first.deleted) == (7, 0, 0, 0)
    assert first.problems == [] and first.embedded == first.chunks > 7
    info = rag.collection("docs")
    assert info.n_documents == 0 or info.n_documents == 7
    assert info.settings["chunking"]["size"] == 448  # bge-small's 512-token window less room for the context

    again = rag.ingest_sync(corpus, "docs")
    assert (again.added, again.updated, again.unchanged, again.embedded) == (0, 0, 7, 0)

    (corpus / "notes.txt").write_text("The office now opens at eight.\n")
    (corpus / "handbook.md").unlink()
    (corpus / "new.md").write_text("# New\n\nA new page about parking.\n")
    third = rag.ingest_sync(corpus, "docs")
    assert (third.added, third.updated, third.unchanged, third.deleted) == (1, 1, 5, 1)
    assert third.embedded <= 2  # only the new and the changed text
    hits = rag.search_sync("when does the office open", "docs", top_k=3).hits
    assert hits[0].chunk.doc_id == "docs/notes.txt" and "eight" in hits[0].chunk.text
    assert not rag.search_sync("rotate a key", "docs", retriever="bm25", filter={"source": "docs/handbook.md"}).hits


def test_a_file_that_turns_unreadable_is_reported_and_kept(rag: RAG, tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "docs")
    rag.ingest_sync(corpus, "docs")
    (corpus / "notes.txt").write_bytes(b"\x00\x01binary now")
    (corpus / "empty.md").write_text("")
    report = rag.ingest_sync(corpus, "docs")
    assert sorted((p.source, p.reason) for p in report.problems) == [
        ("docs/empty.md", "empty file"), ("docs/notes.txt", "unreadable: binary content in a text file"),
    ]  # fmt: skip
    assert report.deleted == 0 and report.unchanged == 6
    assert rag.search_sync("office opens", "docs", retriever="bm25").hits[0].chunk.doc_id == "docs/notes.txt"


def test_missing_paths_and_bad_names_are_input_errors(rag: RAG, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        rag.ingest_sync(tmp_path / "nope", "docs")
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(InputError, match="no supported files"):
        rag.ingest_sync(tmp_path / "empty-folder", "docs")
    with pytest.raises(InputError, match="collection name"):
        rag.ingest_sync(fact_documents(), "../etc")


def test_documents_that_cannot_be_stored_are_cleaned_or_reported(rag: RAG) -> None:
    docs = [
        Document(
            "nul", "text with a \x00 NUL and a lone \ud800 surrogate", title="t\x00", metadata={"k\x00": "v\ud800"}
        ),
        Document("bad\ud800id", "fine text"),
        Document("dup", "first"),
        Document("dup", "second"),
    ]
    report = rag.ingest_sync(docs, "odd")
    assert report.added == 2
    assert sorted(p.reason.split(" ")[0] for p in report.problems) == ["document", "duplicate"]
    hit = rag.search_sync("surrogate NUL text", "odd", retriever="bm25").hits[0]
    assert "\x00" not in hit.chunk.text and "\ufffd" in hit.chunk.text
    assert storable("a\ud800b\x00") == "a\ufffdb"


def test_ingest_resumes_after_a_failure_without_duplicates(rag: RAG, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = [Document(f"d{i}", f"Document number {i} is about topic {i % 7}.") for i in range(30)]
    real_write = type(rag.index).write
    calls = {"n": 0}

    def failing_write(self, info, writes, deletes=()):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the store went away")  # the run stops in the middle
        return real_write(self, info, writes, deletes)

    monkeypatch.setattr(type(rag.index), "write", failing_write)
    with pytest.raises(RuntimeError, match="went away"):
        rag.ingest_sync(docs, "resume")
    done = len(rag.index.document_hashes(rag.collection("resume").collection_id))
    assert 0 < done < 30
    monkeypatch.setattr(type(rag.index), "write", real_write)
    report = rag.ingest_sync(docs, "resume")
    assert report.unchanged == done and report.added == 30 - done
    info = rag.collection("resume")
    assert info.n_chunks == 30
    with rag.index.store.transaction() as cur:
        cur.execute("SELECT doc_id, COUNT(*) FROM rag_chunks GROUP BY doc_id HAVING COUNT(*) > 1")
        assert cur.fetchall() == []


def test_other_settings_are_refused_unless_rebuilt(facts: RAG) -> None:
    other = facts.settings(embedding_model="local-embed")
    with pytest.raises(SettingsMismatch, match="--reembed"):
        facts.ingest_sync(fact_documents(), "facts", settings=other)
    smaller = facts.settings(size=64)
    with pytest.raises(SettingsMismatch, match="chunking"):
        facts.ingest_sync(fact_documents(), "facts", settings=smaller)
    before = facts.collection("facts")
    report = facts.ingest_sync(fact_documents(), "facts", settings=other, reembed=True)
    after = facts.collection("facts")
    assert after.embedding_id == "onnx:all-MiniLM-L6-v2" and before.embedding_id == "onnx:bge-small-en-v1.5"
    assert after.collection_id != before.collection_id and report.unchanged == 4
    assert [c.name for c in facts.collections()] == ["facts"]  # the rebuild collection is not listed
    assert facts.search_sync("moon gravity oceans", "facts", retriever="dense").hits[0].chunk.doc_id == "tides"
    facts.ingest_sync(fact_documents(), "facts", settings=facts.settings(embedding_model="local-embed"))  # same: fine


# --- search ---------------------------------------------------------------------------------------


def test_search_reports_every_retriever(facts: RAG) -> None:
    hits = facts.search_sync("why do oceans have tides", "facts", top_k=4).hits
    top = hits[0]
    assert top.chunk.doc_id == "tides"
    assert top.bm25_rank == 1 and top.dense_rank == 1 and top.fused == top.score
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    bm25 = facts.search_sync("tides", "facts", retriever="bm25").hits
    assert [h.chunk.doc_id for h in bm25] == ["tides"] and bm25[0].dense is None
    dense = facts.search_sync("sleepy felines", "facts", retriever="dense", top_k=1).hits
    assert dense[0].chunk.doc_id == "cats" and dense[0].bm25 is None
    weighted = facts.search_sync("tides", "facts", fusion="weighted", top_k=2).hits
    assert weighted[0].chunk.doc_id == "tides" and weighted[0].score == pytest.approx(1.0)
    filtered = facts.search_sync("tides", "facts", filter={"topic": {"$in": ["cats", "keys"]}}).hits
    assert {h.chunk.doc_id for h in filtered} <= {"cats", "keys"}


def test_search_errors(facts: RAG) -> None:
    with pytest.raises(UnknownCollection, match="facts"):
        facts.search_sync("x", "nope")
    with pytest.raises(InputError, match="empty"):
        facts.search_sync("  ", "facts")
    with pytest.raises(InvalidFilter):
        facts.search_sync("x", "facts", filter='{"topic": {"$regex": "c.*"}}')
    with pytest.raises(InputError, match="retriever"):
        facts.search_sync("x", "facts", retriever="sparse")
    with pytest.raises(InputError, match="no reranker"):
        facts.search_sync("x", "facts", rerank=True)


def test_llm_reranker_reorders_by_grade(facts: RAG, rag_gateway: Gateway) -> None:
    def grade(request: ChatRequest) -> str:
        return json.dumps({"relevance": 3 if "Budgets" in last_user_text(request) else 0})

    rag_gateway._extra["grader"] = FunctionModel(grade)
    plain = facts.search_sync("how do keys work", "facts", top_k=4).hits
    assert plain[0].chunk.doc_id == "keys"
    reranked = facts.search_sync("how do keys work", "facts", top_k=4, rerank="llm:grader").hits
    assert reranked[0].chunk.doc_id == "budgets" and reranked[0].rerank == 1.0
    assert [h.chunk.doc_id for h in reranked[1:]] == [h.chunk.doc_id for h in plain if h.chunk.doc_id != "budgets"]


def test_embedding_reranker_fuses_a_second_models_ranking(facts: RAG, rag_gateway: Gateway) -> None:
    """embed:MODEL: the second model's similarity ranking, fused with the retrieval order by RRF;
    candidate vectors come from the cache the second time."""
    query = "why do oceans rise and fall"
    plain = facts.search_sync(query, "facts", top_k=4, rerank=False).hits
    reranked = facts.search_sync(query, "facts", top_k=4, rerank="embed:local-embed").hits
    assert sorted(h.chunk.chunk_id for h in reranked) == sorted(h.chunk.chunk_id for h in plain)
    assert reranked[0].chunk.doc_id == "tides"
    scores = [h.rerank for h in reranked]
    assert all(s is not None and 0 < s <= 1 for s in scores) and scores == sorted(scores, reverse=True)  # type: ignore[type-var]
    second = np.array(
        rag_gateway.embed_sync([query] + [f"{h.chunk.context}\n{h.chunk.text}" for h in plain], "local-embed").vectors
    )
    similarity = second[1:] @ second[0]
    ranks = {i: r for r, i in enumerate(np.argsort(-similarity), start=1)}
    expected = sorted(range(4), key=lambda i: (-(1 / (61 + i) + 1 / (60 + ranks[i])), i))
    assert [h.chunk.chunk_id for h in reranked] == [plain[i].chunk.chunk_id for i in expected]

    def second_model_calls() -> list[int]:
        found = spans(rag_gateway, operation="embeddings", limit=1000)
        return [s.attributes.get("gen_ai.usage.input_tokens", 0) for s in found if s.name == "embeddings local-embed"]

    before = second_model_calls()
    facts.search_sync(query, "facts", top_k=4, rerank="embed:local-embed")
    assert len(second_model_calls()) == len(before) + 1  # only the query: the candidates' vectors were cached
    with pytest.raises(ConfigError, match="not known"):
        facts.search_sync(query, "facts", rerank="cross:anything")


def test_sentence_reranker_scores_each_candidate_by_its_best_sentence(facts: RAG, rag_gateway: Gateway) -> None:
    """sentences:MODEL: a candidate's closest sentence (context in front) ranks it, fused with retrieval by RRF."""
    from keel.text.sentences import sentence_spans

    query = "why do oceans rise and fall"
    plain = facts.search_sync(query, "facts", top_k=4, rerank=False).hits
    reranked = facts.search_sync(query, "facts", top_k=4, rerank="sentences:local-embed").hits
    assert sorted(h.chunk.chunk_id for h in reranked) == sorted(h.chunk.chunk_id for h in plain)
    best = []
    for hit in plain:
        text, context = hit.chunk.text, hit.chunk.context or hit.chunk.title
        sentences = [f"{context}\n{text[a:b]}" if context else text[a:b] for a, b in sentence_spans(text)]
        vectors = np.array(rag_gateway.embed_sync([query, *sentences], "local-embed").vectors)
        best.append(float(np.max(vectors[1:] @ vectors[0])))
    ranks = {i: r for r, i in enumerate(np.argsort(-np.array(best), kind="stable"), start=1)}
    expected = sorted(range(4), key=lambda i: (-(1 / (61 + i) + 1 / (60 + ranks[i])), i))
    assert [h.chunk.chunk_id for h in reranked] == [plain[i].chunk.chunk_id for i in expected]
    assert all(h.rerank is not None and 0 < h.rerank <= 1 for h in reranked)


# --- answers --------------------------------------------------------------------------------------


def test_a_cited_answer_maps_to_exact_spans(facts: RAG, rag_gateway: Gateway) -> None:
    rag_gateway._extra["answer"] = cite("moon", "Tides come from the pull of the moon and the sun on the oceans.")
    answer = facts.ask_sync("What causes tides?", "facts", model="answer")
    assert answer.kind == "generated" and answer.grounded and not answer.abstained
    (citation,) = answer.citations
    chunk = citation.hit.chunk
    stored = facts.index.document(facts.collection("facts").collection_id, chunk.doc_id)
    assert stored is not None and chunk.doc_id == "tides"
    assert stored.text[chunk.start : chunk.end] == chunk.text
    assert citation.quote is not None and stored.text[citation.quote.start : citation.quote.end] == citation.quote.text
    assert answer.sentences[0].supported and answer.sentences[0].citations == [citation.n]
    assert answer.support > 0.55


def test_unsupported_and_uncited_sentences_are_marked(facts: RAG, rag_gateway: Gateway) -> None:
    def answer(request: ChatRequest) -> str:
        n = source_number(request, "moon")
        return (
            f"Tides are caused by the moon and the sun. [{n}] The tides were discovered by Napoleon in 1802. [{n}]"
            " Surfers love them. Some say [9] proves it."
        )

    rag_gateway._extra["answer"] = FunctionModel(answer)
    result = facts.ask_sync("What causes tides?", "facts", model="answer", mode="generate")
    assert result.kind == "generated" and not result.grounded
    marks = [(s.supported, s.reason) for s in result.sentences]
    assert marks == [
        (True, ""), (False, "its cited sources do not mention 'napoleon', '1802'"), (False, "cites no source"),
        (False, "cites sources that do not exist (there are 4)"),
    ]  # fmt: skip


def test_auto_mode_falls_back_to_quotes_when_the_model_cites_nothing(facts: RAG, rag_gateway: Gateway) -> None:
    rag_gateway._extra["answer"] = FunctionModel(lambda r: "Tides are a thing that happens at sea.")
    result = facts.ask_sync("What causes tides?", "facts", model="answer")
    assert result.kind == "extractive" and "cites no source" in result.reason
    assert result.generated_text == "Tides are a thing that happens at sea."
    assert result.citations and result.citations[0].hit.chunk.doc_id == "tides"
    quote = result.citations[0].quote
    assert quote is not None and quote.text in result.text
    assert result.text.startswith("\u201c") and result.grounded


def test_extractive_mode_needs_no_model(facts: RAG, rag_gateway: Gateway) -> None:
    model = FunctionModel(lambda r: "never")
    rag_gateway._extra["answer"] = model
    result = facts.ask_sync("How many hours do cats sleep?", "facts", model="answer", mode="extractive")
    assert result.kind == "extractive" and "fifteen hours" in result.text and model.requests == []


def test_abstains_when_the_documents_do_not_say(facts: RAG, rag_gateway: Gateway) -> None:
    model = FunctionModel(lambda r: "Paris. [1]")
    rag_gateway._extra["answer"] = model
    result = facts.ask_sync("What is the capital of France?", "facts", model="answer")
    assert result.abstained and result.text == NOT_IN_DOCUMENTS and "too far" in result.reason
    assert model.requests == []  # no model call when retrieval already says no
    rag_gateway._extra["shrug"] = FunctionModel(lambda r: NOT_IN_DOCUMENTS)
    said = facts.ask_sync("What causes tides?", "facts", model="shrug", mode="generate")
    assert said.abstained and "model found no answer" in said.reason


def test_question_limits(facts: RAG, rag_gateway: Gateway) -> None:
    rag_gateway._extra["answer"] = FunctionModel(lambda r: "x")
    with pytest.raises(QueryTooLong, match="context budget"):
        facts.ask_sync("why " * 3000, "facts", model="answer")
    with pytest.raises(InputError, match="empty"):
        facts.ask_sync("", "facts", model="answer")
    with pytest.raises(InputError, match="mode"):
        facts.ask_sync("tides?", "facts", model="answer", mode="creative")  # type: ignore[arg-type]
    tight = facts.ask_sync("What causes tides?", "facts", model="answer", context_tokens=130, mode="extractive")
    assert len(tight.hits) < 4


def test_one_trace_explains_the_answer(facts: RAG, rag_gateway: Gateway) -> None:
    rag_gateway._extra["answer"] = cite("moon", "Tides come from the moon and the sun.")
    answer = facts.ask_sync("What causes tides?", "facts", model="answer", metadata={"feature": "faq"})
    trace = {s.name: s for s in spans(rag_gateway, trace_id=answer.trace_id, limit=100)}
    assert {"rag.ask facts", "rag.retrieve facts", "chat answer", "rag.ground", "embeddings bge-small"} <= set(trace)
    root = trace["rag.ask facts"]
    assert root.parent_id is None and root.attributes["keel.rag.answer_kind"] == "generated"
    assert root.attributes["keel.metadata.feature"] == "faq" and root.output["citations"][0]["doc_id"] == "tides"
    retrieve = trace["rag.retrieve facts"]
    assert retrieve.parent_id == root.span_id
    chunks = retrieve.output["chunks"]
    assert chunks[0]["doc_id"] == "tides" and {"chunk_id", "score", "bm25", "dense"} <= set(chunks[0])
    assert trace["chat answer"].parent_id == root.span_id


def test_vectors_are_unit_length_and_cached(facts: RAG) -> None:
    info = facts.collection("facts")
    embedder = facts.embedder(info)
    vectors = facts.gateway._loop().run(embedder.documents(["Tides and the moon", "Tides and the moon"]))
    assert vectors.shape == (2, 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    again = facts.gateway._loop().run(embedder.documents(["Tides and the moon"]))
    assert embedder.cached >= 1 and np.allclose(again[0], vectors[0])


class Outage:
    """A database that stops answering: no new connections, existing ones killed (what a crash or a failover
    does), until `end`."""

    def __init__(self, admin_url: str, database_url: str) -> None:
        from psycopg.conninfo import conninfo_to_dict

        self.admin_url = admin_url
        self.database = str(conninfo_to_dict(database_url)["dbname"])
        self.started = 0

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement.format(db=f'"{self.database}"'))
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (self.database,),
            )

    def start(self, *, for_s: float | None = None) -> None:
        self.started += 1
        self._admin("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS false")
        if for_s is not None:
            threading.Timer(for_s, self.end).start()

    def end(self) -> None:
        self._admin("ALTER DATABASE {db} WITH ALLOW_CONNECTIONS true")


@pytest.mark.postgres
def test_postgres_going_away_mid_ingest_loses_and_duplicates_nothing(
    tmp_path: Path, pg_database_url: str, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Down for a moment between batches: the write is retried on a new connection and the run completes.
    Down for longer than the retries last: a clear StoreUnavailable, and the next run resumes where it stopped."""
    import keel.rag.ingest as ingest_module

    outage = Outage(pg_url, pg_database_url)
    gw = gateway(tmp_path, "[rag]\nembed_batch = 4\n", store=pg_database_url)
    rag = RAG(gw)
    docs = [Document(f"d{i}", f"Document number {i} is about topic {i % 7}.") for i in range(40)]
    real_write = type(rag.index).write
    plan: dict[int, float | None] = {}  # write call number -> outage length (None: until ended by the test)
    calls = {"n": 0}

    def write_during_outage(self, info, writes, deletes=()):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] in plan:
            outage.start(for_s=plan[calls["n"]])
        return real_write(self, info, writes, deletes)

    monkeypatch.setattr(ingest_module, "WRITE_RETRIES", (0.2, 0.4, 0.8))
    monkeypatch.setattr(type(rag.index), "write", write_during_outage)
    try:
        plan.update({2: 0.3, 4: 0.3})  # two short outages in one run: retried, nothing lost
        report = rag.ingest_sync(docs[:20], "pg")
        assert outage.started == 2 and report.added == 20 and not report.problems
        plan.clear()
        plan[calls["n"] + 2] = None  # from the second write of the next run on, for good
        with pytest.raises(StoreUnavailable, match="run the same command again"):
            rag.ingest_sync(docs, "pg")
        outage.end()
        kept = len(rag.index.document_hashes(rag.collection("pg").collection_id))
        assert 20 < kept < 40  # the first batch of the second run landed, the rest did not
        resumed = rag.ingest_sync(docs, "pg")
        assert resumed.unchanged == kept and resumed.added == 40 - kept
        with rag.index.store.transaction() as cur:
            cur.execute("SELECT COUNT(*), COUNT(DISTINCT doc_id) FROM rag_chunks")
            assert cur.fetchone() == (40, 40)
        assert [h.chunk.doc_id for h in rag.search_sync("Document number 33", "pg", top_k=1).hits] == ["d33"]
    finally:
        outage.end()
        rag.close()
        gw.close()


def test_the_local_model_gets_a_context_sized_for_it(facts: RAG, rag_gateway: Gateway, tmp_path: Path) -> None:
    seen: list[ChatRequest] = []

    def answer(request: ChatRequest) -> str:
        seen.append(request)
        return f"Tides come from the moon. [{source_number(request, 'moon')}]"

    small = FunctionModel(answer)
    small.provider = "local"  # what the answer is sized by: the small model runs on this machine's CPU
    rag_gateway._extra["small"] = small
    rag_gateway._extra["answer"] = FunctionModel(lambda r: "x")
    assert facts.answer_budget("small", None, None) == (LOCAL_CONTEXT_TOKENS, LOCAL_ANSWER_MAX_TOKENS) == (1000, 200)
    assert facts.answer_budget("answer", None, None) == (3000, 400)  # the configured defaults
    assert facts.answer_budget("small", 2500, 300) == (2500, 300)  # a caller's choice wins
    facts.ask_sync("What causes tides?", "facts", model="small", mode="generate")
    assert seen[-1].options.max_tokens == 200

    configured = RAG(gateway(tmp_path / "set", "[rag]\ncontext_tokens = 1800\n", store=rag_gateway.store))
    configured.gateway._extra["small"] = small
    assert configured.answer_budget("small", None, None) == (1800, 200)  # set in keel.toml: kept
    configured.close()
    configured.gateway.close()
