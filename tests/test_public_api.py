"""The exported names are a promise: changing them is a decision, not an accident."""

from __future__ import annotations

import inspect

import keel
from keel import errors


def test_exported_names() -> None:
    assert sorted(keel.__all__) == sorted(
        [
            "Call", "CallContext", "ChatOptions", "ChatRequest", "ChatResult", "ChatStream", "Config",
            "EmbeddingResult", "FunctionModel", "Gateway", "KeelError", "Message", "Model", "ModelResponse",
            "RequestWrapper", "ResponseFormat", "StreamDelta", "TestModel", "Tool", "ToolCall", "Usage", "__version__",
            "errors", "load_config",
        ]
    )  # fmt: skip
    for name in keel.__all__:
        assert hasattr(keel, name), name


def test_error_tree_is_one_tree_and_documented() -> None:
    classes = [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, Exception)]
    assert {c.__name__ for c in classes} == set(errors.__all__) - {"error_for_status"} | {"KeelError"}
    doc = errors.__doc__ or ""
    for cls in classes:
        assert issubclass(cls, errors.KeelError)
        assert cls.__name__ in doc, f"{cls.__name__} missing from the tree in keel.errors' docstring"


def test_caller_mistakes_and_provider_failures_are_separate_branches() -> None:
    assert not issubclass(errors.InputError, errors.ProviderError)
    assert issubclass(errors.ContextWindowExceeded, errors.InputError)
    assert issubclass(errors.MissingAPIKey, errors.ConfigError)
    assert (
        errors.error_for_status(429) is errors.ProviderRateLimited
        and errors.error_for_status(503) is errors.ServerError
    )
    assert errors.ProviderRateLimited.retryable and not errors.BadRequest.retryable


def _keel_error_classes_outside_errors() -> list[str]:
    """`class X(SomeKeelError)` anywhere in src/keel but keel/errors.py (read, not imported: no optional deps)."""
    import ast
    from pathlib import Path

    names = {c.__name__ for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.KeelError)}
    root = Path(errors.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "errors.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if bases & names:
                    found.append(f"{path.relative_to(root)}: {node.name}")
    return found


def test_every_keel_error_lives_in_the_one_tree() -> None:
    assert _keel_error_classes_outside_errors() == []


#: The errors the server and RAG raise, moved into keel.errors: each keeps its HTTP status and code.
MOVED_ERRORS = {
    "Unauthorized": (401, "invalid_api_key"),
    "Forbidden": (403, "forbidden"),
    "StoreUnavailable": (503, "store_unavailable"),
    "StoreDisabled": (503, "store_disabled"),
    "NotFound": (404, "not_found"),
    "BodyError": (400, "invalid_request"),
    "BodyTooLarge": (413, "request_too_large"),
    "ClientDisconnected": (499, "client_disconnected"),
    "NoSuchModel": (404, "model_not_found"),
    "InvalidFilter": (400, "invalid_filter"),
    "QueryTooLong": (400, "query_too_long"),
    "SettingsMismatch": (409, "collection_settings_mismatch"),
    "CollectionExists": (409, "collection_exists"),
    "UnknownCollection": (404, "collection_not_found"),
}


def test_moved_errors_keep_their_status_and_code() -> None:
    for name, (status, code) in MOVED_ERRORS.items():
        cls = getattr(errors, name)
        assert (cls.http_status, cls.code) == (status, code), name


def test_the_caller_s_mistakes_are_input_errors_and_one_store_unavailable_serves_all() -> None:
    import keel.rag

    for name in ("Unauthorized", "Forbidden", "NotFound", "BodyError", "BodyTooLarge", "NoSuchModel", "InvalidFilter",
                 "QueryTooLong", "SettingsMismatch", "CollectionExists", "UnknownCollection"):  # fmt: skip
        assert issubclass(getattr(errors, name), errors.InputError), name
    assert keel.rag.StoreUnavailable is errors.StoreUnavailable  # the RAG re-export is the one class
    assert not issubclass(errors.StoreUnavailable, errors.InputError)
