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
