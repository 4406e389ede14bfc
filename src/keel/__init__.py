"""keel: the production layer for LLM features.

from keel import Gateway
gw = Gateway()
print(gw.chat_sync("What is RAG?").text)
"""

from keel import errors
from keel.config import Config, load_config
from keel.errors import KeelError
from keel.gateway import ChatStream, Gateway
from keel.gateway.pipeline import Call, CallContext, RequestWrapper
from keel.models import FunctionModel, Model, TestModel
from keel.types import (
    ChatOptions,
    ChatRequest,
    ChatResult,
    EmbeddingResult,
    Message,
    ModelResponse,
    ResponseFormat,
    StreamDelta,
    Tool,
    ToolCall,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "Call",
    "CallContext",
    "ChatOptions",
    "ChatRequest",
    "ChatResult",
    "ChatStream",
    "Config",
    "EmbeddingResult",
    "FunctionModel",
    "Gateway",
    "KeelError",
    "Message",
    "Model",
    "ModelResponse",
    "RequestWrapper",
    "ResponseFormat",
    "StreamDelta",
    "TestModel",
    "Tool",
    "ToolCall",
    "Usage",
    "__version__",
    "errors",
    "load_config",
]
