"""Run the daemon: the engine and uvicorn on one event loop, in the foreground (`tetris serve`)
or on a background thread (tests, `--demo`)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from typing import Any

from tetris.runtime.deployment import Deployment
from tetris.runtime.server.app import create_app

READY_TIMEOUT_S = 120.0


def _server(deployment: Deployment, log_level: str) -> Any:
    import uvicorn

    config = deployment.config
    app = create_app(deployment.engine, deployment.metrics,
                     max_token_chars=deployment.tokenizer.max_token_chars)
    return uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                         log_level=log_level, lifespan="off"))


async def _serve(deployment: Deployment, server: Any) -> None:
    await deployment.engine.start()
    try:
        await server.serve()
    finally:
        await deployment.engine.stop()


def serve_forever(deployment: Deployment, log_level: str = "info") -> None:
    """Serve until interrupted (uvicorn handles SIGINT/SIGTERM), then stop the actors."""
    try:
        asyncio.run(_serve(deployment, _server(deployment, log_level)))
    finally:
        deployment.shutdown()


class ServerThread:
    """`with ServerThread(deployment) as url:` serves on a thread until the block ends."""

    def __init__(self, deployment: Deployment, log_level: str = "warning") -> None:
        self.deployment = deployment
        self.server = _server(deployment, log_level)
        self.thread = threading.Thread(target=self._run, name="tetris-serve", daemon=True)
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        c = self.deployment.config
        return f"http://{c.host}:{c.port}"

    def _run(self) -> None:
        try:
            # Signal handlers belong to the main thread.
            self.server.install_signal_handlers = lambda: None
            asyncio.run(_serve(self.deployment, self.server))
        except BaseException as err:  # reported by __enter__/__exit__
            self.error = err

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.error is not None:
                raise RuntimeError(f"the server failed to start: {self.error}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return self.url
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"the server did not answer /health within {READY_TIMEOUT_S} s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
