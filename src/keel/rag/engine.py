"""`RAG`: collections, ingestion, search and cited answers over one gateway and one store.

    from keel import Gateway
    from keel.rag import RAG

    with Gateway() as gw:
        rag = RAG(gw)
        rag.ingest_sync("docs/", collection="handbook")
        answer = rag.ask_sync("How do I rotate a key?", collection="handbook")
        print(answer.text, [c.to_json() for c in answer.citations])

Every operation is traced in the gateway's store: `rag.ask` is the root span
of a question, with `rag.retrieve` (and its query embedding), `rag.rerank`,
the `chat` call that generated the answer and `rag.ground` under it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from keel.errors import (
    ConfigError,
    InputError,
    ModelNotAllowed,
    QueryTooLong,
    SettingsMismatch,
    UnknownCollection,
    UnknownModel,
)
from keel.gateway import Gateway
from keel.gateway.pipeline import CallContext
from keel.rag.answer import (
    LOCAL_ANSWER_MAX_TOKENS,
    LOCAL_CONTEXT_TOKENS,
    NOT_IN_DOCUMENTS,
    Answer,
    CheckedSentence,
    Citation,
    Quote,
    build_messages,
    check_sentences,
    extract,
    is_abstention,
    pack_context,
    parse_answer,
    source_sentences,
)
from keel.rag.collection import REBUILD_PREFIX, CollectionSettings, check_name, settings_from_config
from keel.rag.embedder import Embedder, EmbeddingSpace
from keel.rag.filters import parse_filter
from keel.rag.index import CollectionInfo, RagIndex, open_index
from keel.rag.ingest import IngestProgress, IngestReport, Source, documents_source, path_source, run_ingest
from keel.rag.rerank import Reranker, make_reranker
from keel.rag.retrieve import Hit, Retrieval, RetrievalOptions, Retriever
from keel.text.documents import Document, storable
from keel.text.grounding import rescale_cosine

__all__ = ["RAG"]

AnswerMode = Literal["auto", "generate", "extractive"]


class RAG:
    def __init__(self, gateway: Gateway, *, index: RagIndex | None = None) -> None:
        if gateway.store is None and index is None:
            raise ConfigError("RAG keeps its collections in the store; this gateway has none (store=False)")
        self.gateway = gateway
        self.config = gateway.config.rag
        assert gateway.store is not None or index is not None
        self.index = index or open_index(gateway.store)  # type: ignore[arg-type]
        self._spaces: dict[str, EmbeddingSpace] = {}

    # --- collections ------------------------------------------------------------------------

    def collections(self) -> list[CollectionInfo]:
        return [c for c in self.index.collections() if not c.name.startswith(REBUILD_PREFIX)]

    def collection(self, name: str) -> CollectionInfo:
        info = self.index.collection(name) if isinstance(name, str) else None
        if info is None or name.startswith(REBUILD_PREFIX):
            known = ", ".join(c.name for c in self.collections()) or "none yet (keel rag ingest PATH --collection NAME)"
            raise UnknownCollection(f"unknown collection {name!r}; collections: {known}")
        return info

    def drop(self, name: str) -> None:
        self.index.drop_collection(self.collection(name))

    def _space(self, model: str) -> EmbeddingSpace:
        if model not in self._spaces:
            self._spaces[model] = EmbeddingSpace.of(self.gateway, model)
        return self._spaces[model]

    def _collection_space(self, info: CollectionInfo) -> EmbeddingSpace:
        """The embedding model of a collection, checked to still be the one its vectors came from."""
        try:
            space = self._space(info.embedding_model)
        except UnknownModel:
            raise ConfigError(
                f"collection {info.name!r} was embedded with {info.embedding_model!r} ({info.embedding_id}), which is"
                " no longer configured; configure it again, or rebuild the collection with another model (--reembed)"
            ) from None
        if space.identity != info.embedding_id:
            raise SettingsMismatch(
                f"collection {info.name!r} holds vectors of {info.embedding_id}, but {info.embedding_model!r} is now"
                f" {space.identity}; vectors of two models never mix: rebuild it (--reembed) or restore the model"
            )
        return space

    def embedder(self, info: CollectionInfo) -> Embedder:
        return Embedder(self.gateway, self._collection_space(info), self.index)

    async def create(self, name: str, settings: CollectionSettings) -> CollectionInfo:
        check_name(name)
        return await self._create(name, settings)

    async def _create(self, name: str, settings: CollectionSettings) -> CollectionInfo:
        """Create without the name check (a rebuild's shadow collection has a name no user can give)."""
        space = self._space(settings.embedding_model)
        self._check_window(space, settings)
        embedder = Embedder(self.gateway, space, self.index)
        dimensions = await embedder.dimensions()
        tokenizer = space.tokens().name
        return await asyncio.to_thread(
            self.index.create_collection, name, embedding_model=space.name, embedding_id=space.identity,
            dimensions=dimensions, settings=settings.stored(space.identity, tokenizer),
        )  # fmt: skip

    def _check_window(self, space: EmbeddingSpace, settings: CollectionSettings) -> None:
        if space.window is not None and settings.chunking.size > space.window:
            raise InputError(
                f"chunk size {settings.chunking.size} is larger than {space.name}'s window of {space.window} tokens:"
                " the end of every chunk would not be embedded; use a smaller size"
            )

    # --- ingestion --------------------------------------------------------------------------------

    async def ingest(
        self,
        source: str | Path | Source | Iterable[Document],
        collection: str,
        *,
        settings: CollectionSettings | None = None,
        reembed: bool = False,
        metadata: Mapping[str, Any] | None = None,
        progress: IngestProgress | None = None,
        key: str | None = None,
    ) -> IngestReport:
        """Ingest a file, a folder, a `Source` (e.g. `file_source`: one file of a folder), or documents into a
        collection (created on first use).

        `settings` apply to a new collection; for an existing one they must match what it was built with,
        unless `reembed` asks to rebuild it with them (re-chunking and re-embedding the stored documents).
        """
        check_name(collection)
        if isinstance(source, Source):
            src = source
        elif isinstance(source, (str, Path)):
            src = path_source(Path(source), max_bytes=self.config.max_file_bytes, metadata=dict(metadata or {}))
        else:
            src = documents_source(source)
        info = self.index.collection(collection)
        with self.gateway.tracer.span(f"rag.ingest {collection}") as span:
            span.set(gen_ai__operation__name="rag.ingest", keel__rag__collection=collection)
            report = IngestReport(collection, trace_id=span.trace_id)
            if info is None:
                info = await self.create(collection, settings or self.settings())
            elif settings is not None and (difference := self._difference(info, settings)):
                if not reembed:
                    raise SettingsMismatch(
                        f"collection {collection!r} was built with {difference}. Vectors and chunks of two settings"
                        " never mix: pass --reembed to rebuild it with the new ones, or use another collection"
                    )
                info = await self._rebuild(info, settings, progress=None, key=key)
            report = await self._run(info, src, progress=progress, key=key, report=report)
            span.set(keel__rag__documents=report.documents, keel__rag__chunks=report.chunks)
            span.output = report.to_json()
            return report

    async def ensure_collection(self, name: str, settings: CollectionSettings) -> CollectionInfo:
        """The collection, created with `settings` if missing; SettingsMismatch if it was built with others
        (a job fixes a collection's settings before its workers ingest into it)."""
        check_name(name)
        info = self.index.collection(name)
        if info is None:
            return await self.create(name, settings)
        if difference := self._difference(info, settings):
            raise SettingsMismatch(
                f"collection {name!r} was built with {difference}; rebuild it first (keel rag ingest --reembed),"
                " or use another collection"
            )
        return info

    def settings(
        self,
        *,
        embedding_model: str | None = None,
        strategy: str | None = None,
        size: int | None = None,
        overlap: int | None = None,
    ) -> CollectionSettings:
        """Settings for a new collection: the given ones, else `[rag]`, else sized to the embedding model's window."""
        space = self._space(embedding_model or self.config.embedding_model)
        return settings_from_config(
            self.config, window=space.window, embedding_model=space.name, strategy=strategy, size=size,
            overlap=overlap,
        )  # fmt: skip

    def _difference(self, info: CollectionInfo, settings: CollectionSettings) -> str:
        space = self._space(settings.embedding_model)
        stored = CollectionSettings.from_stored(info.settings)
        parts = []
        if space.identity != info.embedding_id:
            parts.append(
                f"embedding model {info.embedding_model} ({info.embedding_id}), not {space.name} ({space.identity})"
            )
        if settings.chunking != stored.chunking:
            parts.append(f"chunking {stored.chunking.model_dump()}, not {settings.chunking.model_dump()}")
        return "; ".join(parts)

    async def _run(
        self, info: CollectionInfo, source: Source, *, progress: IngestProgress | None, key: str | None,
        report: IngestReport | None = None,
    ) -> IngestReport:  # fmt: skip
        space = self._collection_space(info)
        settings = CollectionSettings.from_stored(info.settings)
        return await run_ingest(
            self.index, info, Embedder(self.gateway, space, self.index), source, settings=settings.chunking,
            tokens=space.tokens(), batch=self.config.embed_batch, progress=progress, key=key, report=report,
        )  # fmt: skip

    async def rebuild(
        self, collection: str, settings: CollectionSettings, *, progress: IngestProgress | None = None,
        key: str | None = None,
    ) -> CollectionInfo:  # fmt: skip
        """Re-chunk and re-embed a collection's stored documents with new settings; searches use the old
        collection until the new one is complete, then the new one replaces it. Resumable."""
        return await self._rebuild(self.collection(collection), settings, progress=progress, key=key)

    async def _rebuild(
        self, info: CollectionInfo, settings: CollectionSettings, *, progress: IngestProgress | None, key: str | None
    ) -> CollectionInfo:
        shadow_name = REBUILD_PREFIX + info.name
        shadow = self.index.collection(shadow_name)
        if shadow is not None and self._difference(shadow, settings):
            await asyncio.to_thread(self.index.drop_collection, shadow)  # an older rebuild with other settings
            shadow = None
        if shadow is None:
            shadow = await self._create(shadow_name, settings)
        source = Source(lambda: self.index.iter_documents(info.collection_id), None, info.n_chunks or None)
        with self.gateway.tracer.span(f"rag.rebuild {info.name}") as span:
            span.set(gen_ai__operation__name="rag.rebuild", keel__rag__collection=info.name)
            await self._run(shadow, source, progress=progress, key=key)
            keep = set(await asyncio.to_thread(self.index.document_hashes, info.collection_id))
            extra = set(await asyncio.to_thread(self.index.document_hashes, shadow.collection_id)) - keep
            if extra:
                await asyncio.to_thread(self.index.write, shadow, [], sorted(extra))
            await asyncio.to_thread(self.index.rename_collection, shadow, info.name, replacing=info)
        return self.collection(info.name)

    # --- search -------------------------------------------------------------------------------------

    def options(
        self,
        *,
        retriever: str | None = None,
        fusion: str | None = None,
        rrf_k: float | None = None,
        dense_weight: float | None = None,
        candidates: int | None = None,
        top_k: int | None = None,
        filter: Mapping[str, Any] | str | None = None,
    ) -> RetrievalOptions:
        c = self.config
        return RetrievalOptions(
            mode=retriever or c.retriever,  # type: ignore[arg-type]
            fusion=fusion or c.fusion,  # type: ignore[arg-type]
            rrf_k=c.rrf_k if rrf_k is None else rrf_k,
            dense_weight=c.dense_weight if dense_weight is None else dense_weight,
            candidates=c.candidates if candidates is None else candidates,
            top_k=c.top_k if top_k is None else top_k,
            conditions=parse_filter(filter),
        ).check()

    def reranker(self, rerank: bool | str | None) -> Reranker | None:
        if rerank is False:
            return None
        spec = rerank if isinstance(rerank, str) else self.config.reranker
        if rerank is True and not spec:
            raise InputError("no reranker is configured: set rag.reranker (llm:gpt-4o-mini, or embed:MODEL)")
        return make_reranker(self.gateway, spec, self.index)

    async def search(
        self,
        query: str,
        collection: str,
        *,
        rerank: bool | str | None = None,
        key: str | None = None,
        **options: Any,
    ) -> Retrieval:
        """Retrieve (and optionally rerank) chunks for a query: scores of every retriever on every hit."""
        query = _check_query(query)
        info = self.collection(collection)
        self._check_key(key, info, None)
        opts = self.options(**options)
        retrieval, _ = await self._retrieve(query, info, opts, self.reranker(rerank), key)
        return retrieval

    def _check_key(self, key: str | None, info: CollectionInfo, answer_model: str | None) -> None:
        """Refuse up front, naming the model and why RAG needs it: a key made for chat ("--models
        gpt-4o-mini,local") would otherwise meet a bare 403 on the collection's embedding model."""
        config = self.gateway.keys.get(key) if key is not None else None
        if config is None or config.models is None:
            return
        allowed = config.models
        usable = {self.gateway.resolve(m) for m in allowed}
        embedding = info.embedding_model
        if embedding in self.gateway.model_names and self.gateway.resolve(embedding) not in usable:
            raise ModelNotAllowed(
                f"key {key!r} may not use {embedding!r}, the embedding model of collection {info.name!r}: RAG embeds"
                f" every question with it to search the collection. Allow it too, e.g. a key created with --models"
                f" {','.join([*allowed, embedding])} (allowed now: {', '.join(allowed)})"
            )
        if answer_model is not None and answer_model not in usable:
            raise ModelNotAllowed(
                f"key {key!r} may not use {answer_model!r}, the chat model that writes RAG answers (rag.answer_model"
                f" or the request's model); allowed: {', '.join(allowed)}"
            )

    async def _retrieve(
        self, query: str, info: CollectionInfo, options: RetrievalOptions, reranker: Reranker | None, key: str | None
    ) -> tuple[Retrieval, Embedder]:
        embedder = self.embedder(info)
        retriever = Retriever(self.index, embedder, info, self.gateway.tracer)
        keep = max(options.top_k, self.config.rerank_candidates) if reranker else options.top_k
        retrieval = await retriever.retrieve(query, options, key=key, keep=keep)
        if reranker is not None and retrieval.hits:
            with self.gateway.tracer.span(f"rag.rerank {info.name}") as span:
                span.set(gen_ai__operation__name="rerank", keel__rag__reranker=reranker.name)
                t0 = time.perf_counter()
                reranked = await reranker.rerank(query, retrieval.hits, key=key)
                retrieval.hits, retrieval.cut = reranked[: options.top_k], reranked[options.top_k :]
                retrieval.timings_ms["rerank_ms"] = round((time.perf_counter() - t0) * 1000, 3)
                span.output = {"chunks": [{"chunk_id": h.chunk.chunk_id, "rerank": h.rerank} for h in retrieval.hits]}
        else:
            retrieval.hits = retrieval.hits[: options.top_k]
        return retrieval, embedder

    # --- answers -----------------------------------------------------------------------------------

    async def ask(
        self,
        question: str,
        collection: str,
        *,
        mode: AnswerMode | None = None,
        model: str | None = None,
        rerank: bool | str | None = None,
        context_tokens: int | None = None,
        max_tokens: int | None = None,
        key: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        context: CallContext | None = None,
        **options: Any,
    ) -> Answer:
        """An answer with [n] citations, each sentence checked against what it cites, or an abstention."""
        question = _check_query(question)
        mode = mode or self.config.answer_mode
        if mode not in ("auto", "generate", "extractive"):
            raise InputError(f"mode must be auto, generate or extractive, not {mode!r}")
        model_name = self.gateway.resolve(model or self.config.answer_model)
        budget, max_tokens = self.answer_budget(model_name, context_tokens, max_tokens)
        started = time.perf_counter()
        with self.gateway.tracer.span(f"rag.ask {collection}") as span:
            span.set(gen_ai__operation__name="rag", keel__rag__collection=collection, keel__rag__mode=mode)
            if context is not None:  # who the question is for (tenant, user, session, tags)
                span.attributes.update(context.span_attributes())
            if key is not None:
                span.attributes["keel.api_key"] = key
            for k, v in (metadata or {}).items():
                span.attributes[f"keel.metadata.{k}"] = v
            span.input = {"question": question}
            info = self.collection(collection)
            self._check_key(key, info, None if mode == "extractive" else model_name)
            question_tokens = self.gateway.count_tokens(question, model_name)
            if question_tokens > budget // 2:
                raise QueryTooLong(
                    f"the question is {question_tokens} tokens; at most half the context budget ({budget // 2} of"
                    f" {budget}) may be question, the rest is for the sources"
                )
            retrieval, embedder = await self._retrieve(
                question, info, self.options(**options), self.reranker(rerank), key
            )
            answer = await self._answer(question, retrieval.hits, embedder, mode, model_name, budget, max_tokens, key)
            answer.retrieval = retrieval  # what an evaluation scores retrieval on: no second search
            answer.latency_s = time.perf_counter() - started
            answer.trace_id = span.trace_id
            span.set(keel__rag__answer_kind=answer.kind, keel__rag__support=round(answer.support, 4))
            span.set(keel__rag__grounded=answer.grounded, keel__cost_usd=None)
            span.output = {
                "answer": answer.text, "kind": answer.kind, "reason": answer.reason or None,
                "citations": [c.to_json() for c in answer.citations],
                "sentences": [s.to_json() for s in answer.sentences],
            }  # fmt: skip
            return answer

    def answer_budget(self, model: str, context_tokens: int | None, max_tokens: int | None) -> tuple[int, int]:
        """Context tokens and answer tokens for `model`: the caller's, else the configured ones; the
        small local model gets less of both unless rag.context_tokens / rag.answer_max_tokens are set."""
        c = self.config
        local = self.gateway._model_config(model).provider == "local"  # the config: building it could fail here
        chosen = c.model_fields_set
        budget = c.context_tokens if "context_tokens" in chosen or not local else LOCAL_CONTEXT_TOKENS
        answer = c.answer_max_tokens if "answer_max_tokens" in chosen or not local else LOCAL_ANSWER_MAX_TOKENS
        return context_tokens or budget, max_tokens or answer

    async def _answer(
        self, question: str, hits: list[Hit], embedder: Embedder, mode: str, model: str, budget: int,
        max_tokens: int, key: str | None,
    ) -> Answer:  # fmt: skip
        query_vector = await embedder.query(question, key=key)
        support = await self._support(query_vector, hits, embedder)
        if not hits or support < self.config.min_support:
            why = "nothing was retrieved" if not hits else (
                f"the closest passage is too far from the question (support {support:.2f} < {self.config.min_support})"
            )  # fmt: skip
            return Answer(question, NOT_IN_DOCUMENTS, "abstained", support=support, reason=why)
        packed = pack_context(question, hits, budget, lambda t: self.gateway.count_tokens(t, model))
        if not packed:
            return Answer(question, NOT_IN_DOCUMENTS, "abstained", support=support,
                          reason=f"no retrieved passage fits the context budget of {budget} tokens")  # fmt: skip
        sources = source_sentences(packed)
        source_vectors = await embedder.documents([q.text for _, q in sources], key=key)
        if mode == "extractive":
            return self._extractive(question, packed, query_vector, sources, source_vectors, support, "")
        result = await self.gateway.chat(
            build_messages(question, packed), model, temperature=0.0,
            max_tokens=max_tokens, key=key, metadata={"purpose": "rag.answer"},
        )  # fmt: skip
        usage = {"input_tokens": result.usage.input_tokens, "output_tokens": result.usage.output_tokens}
        generated = result.text.strip()
        common: dict[str, Any] = {"model": result.model, "usage": usage, "cost_usd": result.cost_usd}
        if is_abstention(generated):
            if mode == "generate":
                reason = "the model found no answer in the sources"
                return Answer(question, NOT_IN_DOCUMENTS, "abstained", support=support, hits=packed, reason=reason,
                              **common)  # fmt: skip
            why = "the model found no answer in the sources; quoting the closest passages"
            answer = self._extractive(question, packed, query_vector, sources, source_vectors, support, why)
            return _replaced(answer, generated, common)
        checked, quotes = await self._ground(generated, packed, embedder, sources, source_vectors, key)
        answer = Answer(question, generated, "generated", support=support, hits=packed, sentences=checked, **common)
        answer.citations = _citations(checked, packed, quotes)
        supported = sum(s.supported for s in checked)
        if mode == "auto" and (not answer.citations or supported * 2 < len(checked)):
            why = "the model's answer cites no source" if not answer.citations else (
                f"only {supported} of {len(checked)} sentences of the model's answer are supported by their sources"
            )  # fmt: skip
            fallback = self._extractive(
                question, packed, query_vector, sources, source_vectors, support, why + "; quoting the passages instead"
            )
            return _replaced(fallback, generated, common)
        return answer

    async def _support(self, query_vector: np.ndarray, hits: list[Hit], embedder: Embedder) -> float:
        """How close the best retrieved chunk is to the question, 0-1 (rescaled cosine)."""
        if not hits:
            return 0.0
        best = max((h.dense for h in hits if h.dense is not None), default=None)
        if best is None or len([h for h in hits if h.dense is not None]) < len(hits):
            vectors = await embedder.documents([h.chunk.indexed_text for h in hits[:5]])
            best = max(best or -1.0, float(np.max(vectors @ query_vector)))
        return float(rescale_cosine(best))

    async def _ground(
        self, text: str, hits: list[Hit], embedder: Embedder, sources: list[tuple[int, Quote]],
        source_vectors: np.ndarray, key: str | None,
    ) -> tuple[list[CheckedSentence], dict[int, Quote]]:  # fmt: skip
        with self.gateway.tracer.span("rag.ground") as span:
            span.set(gen_ai__operation__name="rag.ground")
            sentences = parse_answer(text)
            if not sentences:
                return [], {}
            vectors = await embedder.documents([s.text or "-" for s in sentences], key=key)
            checked, quotes = check_sentences(
                sentences,
                vectors,
                sources,
                source_vectors,
                len(hits),
                self.config.grounding_threshold,
                {n: h.chunk.context or h.chunk.title for n, h in enumerate(hits, start=1)},
            )
            span.set(keel__rag__sentences=len(checked), keel__rag__supported=sum(s.supported for s in checked))
            span.output = {"sentences": [s.to_json() for s in checked]}
            return checked, quotes

    def _extractive(
        self, question: str, hits: list[Hit], query_vector: np.ndarray, sources: list[tuple[int, Quote]],
        source_vectors: np.ndarray, support: float, reason: str,
    ) -> Answer:  # fmt: skip
        picked = extract(question, query_vector, sources, source_vectors)
        if not picked:
            return Answer(question, NOT_IN_DOCUMENTS, "abstained", support=support, hits=hits,
                          reason="no sentence of the retrieved passages is close to the question")  # fmt: skip
        numbers: dict[int, int] = {}  # source number in the prompt -> citation number in this answer
        citations: list[Citation] = []
        parts, sentences = [], []
        cursor = 0
        for n, quote, _score in picked:
            if n not in numbers:
                numbers[n] = len(numbers) + 1
                citations.append(Citation(numbers[n], hits[n - 1], quote))
            piece = f"\u201c{quote.text}\u201d [{numbers[n]}]"
            sentences.append(CheckedSentence(quote.text, cursor, cursor + len(piece), [numbers[n]], True, 1.0,
                                             "quoted from the source"))  # fmt: skip
            parts.append(piece)
            cursor += len(piece) + 1
        return Answer(question, " ".join(parts), "extractive", citations=citations, sentences=sentences,
                      support=support, reason=reason, hits=hits)  # fmt: skip

    # --- sync twins ------------------------------------------------------------------------------------

    def ingest_sync(
        self, source: str | Path | Source | Iterable[Document], collection: str, **kwargs: Any
    ) -> IngestReport:
        return self.gateway._loop().run(self.ingest(source, collection, **kwargs))

    def search_sync(self, query: str, collection: str, **kwargs: Any) -> Retrieval:
        return self.gateway._loop().run(self.search(query, collection, **kwargs))

    def ask_sync(self, question: str, collection: str, **kwargs: Any) -> Answer:
        return self.gateway._loop().run(self.ask(question, collection, **kwargs))

    def close(self) -> None:
        self.index.close()


def _check_query(query: str) -> str:
    if not isinstance(query, str) or not query.strip():
        raise InputError("the question is empty")
    return storable(query)


def _replaced(answer: Answer, generated: str, common: dict[str, Any]) -> Answer:
    """An answer that replaced the model's own: keeps what the model said and what it cost."""
    answer.generated_text = generated
    answer.model, answer.usage, answer.cost_usd = common["model"], common["usage"], common["cost_usd"]
    return answer


def _citations(checked: list[CheckedSentence], hits: list[Hit], quotes: dict[int, Quote]) -> list[Citation]:
    """One citation per source number the answer uses, in order of first use."""
    used: list[int] = []
    for sentence in checked:
        for n in sentence.citations:
            if 1 <= n <= len(hits) and n not in used:
                used.append(n)
    return [Citation(n, hits[n - 1], quotes.get(n)) for n in used]
