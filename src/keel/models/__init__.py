"""Model adapters: one file per wire API."""

from keel.models.base import Model, StreamItem, WrapperModel
from keel.models.test import FunctionModel, TestModel

__all__ = ["FunctionModel", "Model", "StreamItem", "TestModel", "WrapperModel"]
