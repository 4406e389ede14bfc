"""A real keel server (uvicorn, in a thread) for tests that need HTTP on a socket."""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI

from keel import Gateway
from keel.server.app import create_app
from stubs import free_port

#: Starlette's TestClient as a direct local caller (the open mode answers only those).
LOCAL: dict[str, object] = {"base_url": "http://127.0.0.1", "client": ("127.0.0.1", 50000)}


class Server:
    def __init__(self, gateway: Gateway | None = None, *, app: FastAPI | None = None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1"
        asgi = app or create_app(gateway=gateway)
        config = uvicorn.Config(asgi, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
