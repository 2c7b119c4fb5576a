"""Run an app under a real uvicorn server on a free loopback port, in a background thread."""

from __future__ import annotations

import threading
import time
from types import TracebackType

import httpx
import uvicorn
from fastapi import FastAPI


class LiveServer:
    """`with LiveServer(app) as server:` serves `app` on 127.0.0.1:<free port> until exit."""

    def __init__(self, app: FastAPI, *, ready_timeout: float = 120.0,
                 wait_ready: bool = True) -> None:
        self.app = app
        self.ready_timeout = ready_timeout
        self.wait_ready = wait_ready
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                access_log=False, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:  # noqa: PYI034 - py310 has no typing.Self
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        if self.wait_ready:
            deadline = time.monotonic() + self.ready_timeout
            while httpx.get(self.url + "/ready").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("server not ready in time")
                time.sleep(0.05)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
