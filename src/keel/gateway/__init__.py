"""The gateway: a stack of wrappers around each model, and the Gateway that routes."""

from keel.gateway.core import ChatStream, Gateway

__all__ = ["ChatStream", "Gateway"]
