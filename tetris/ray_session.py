"""Joining or starting Ray: a private local cluster listens on loopback only and requires a
per-process random token (Ray token authentication); joining an existing cluster leaves its
network and auth settings to the operator (docs/security.md)."""

from __future__ import annotations

import importlib
import ipaddress
import os
import secrets
import sys
from typing import Any

# Ray reads this once, at import, to decide whether "127.0.0.1" may stay the node address;
# left on, it swaps loopback for the machine's network address and every gRPC server of the
# GCS, raylet, driver and workers then listens on all interfaces.
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_AUTH_MODE_ENV = "RAY_AUTH_MODE"
_TOKEN_ENV = "RAY_AUTH_TOKEN"
_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


def _prepare_local_env() -> bool:
    """Environment for a private local cluster; inherited by every Ray process it spawns.
    Returns whether the auth mode was changed here (cached Ray config must then be reloaded)."""
    os.environ[_CLUSTER_ENV] = "0"
    changed = False
    if _AUTH_MODE_ENV not in os.environ:
        # An operator's explicit RAY_AUTH_MODE=disabled is honoured: loopback still holds.
        os.environ[_AUTH_MODE_ENV] = "token"
        changed = True
    if os.environ[_AUTH_MODE_ENV].lower() == "token" and not (
            os.environ.get(_TOKEN_ENV) or os.environ.get(_TOKEN_PATH_ENV)):
        # A token of our own, in the environment only: Ray would otherwise write (or reuse)
        # ~/.ray/auth_token, shared by every cluster this user starts. It stays for the life of
        # the process so a later init_ray reuses it (Ray caches the token it loaded).
        os.environ[_TOKEN_ENV] = secrets.token_hex(32)
    return changed


def _apply_to_imported_ray(ray: Any, auth_changed: bool) -> None:
    """Ray imported before _prepare_local_env (a test session, another module) has already
    read the environment; push the new values into its cached state."""
    constants = getattr(getattr(ray, "_private", None), "ray_constants", None)
    if constants is not None and hasattr(constants, "ENABLE_RAY_CLUSTER"):
        constants.ENABLE_RAY_CLUSTER = False
    if auth_changed:
        # Ray < 2.52 has no token authentication, so nothing to reload.
        config = getattr(importlib.import_module("ray._raylet"), "Config", None)
        if config is not None:
            # What Ray itself does after switching the mode (authentication_token_setup.py).
            config.initialize("")


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> Any:
    """Start a private loopback Ray with token auth (address None or "local") or join
    `address`; a session already initialised in this process is reused. Returns `ray`."""
    already = sys.modules.get("ray")
    if already is not None and already.is_initialized():
        return already
    local = address in (None, "local")
    auth_changed = _prepare_local_env() if local else False
    try:
        import ray
    except ImportError:
        raise ValueError("Ray is not installed: pip install 'ray>=2.9'") from None
    if ray.is_initialized():
        return ray
    if not local:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        return ray
    _apply_to_imported_ray(ray, auth_changed)
    # address="local" always starts a new cluster: without it Ray joins whatever cluster
    # /tmp/ray/ray_current_cluster names (one started by `ray start`, even a dead one).
    ray.init(address="local", include_dashboard=False, num_cpus=num_cpus or os.cpu_count() or 1,
             _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    node_ip = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    if not _is_loopback(node_ip):
        # Fail closed: a private cluster on a network address would accept remote drivers.
        ray.shutdown()
        raise RuntimeError(f"the private Ray came up on {node_ip}, not loopback; set "
                           f"{_CLUSTER_ENV}=0 before Ray is imported")
    return ray
