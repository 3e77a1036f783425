"""Every HTTP request's id: sent back as `X-Request-Id`, named in 5xx bodies and in the log lines
that hold the details, so an operator can find what a client was told about."""

from __future__ import annotations

import uuid

from starlette.types import Scope

HEADER = "X-Request-Id"
_SCOPE_KEY = "tetris.request_id"  # its own key: uvicorn copies the lifespan state into "state"


def assign(scope: Scope) -> str:
    rid = f"req-{uuid.uuid4().hex}"
    scope[_SCOPE_KEY] = rid
    return rid


def of(scope: Scope) -> str:
    """The request's id; a request that bypassed the middleware gets one now."""
    rid = scope.get(_SCOPE_KEY)
    return rid if isinstance(rid, str) else assign(scope)
