"""Joining or starting Ray: a private local cluster is bound to loopback, without dashboard."""

from __future__ import annotations

import os
from typing import Any


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> Any:
    """Start a private loopback Ray (address None or "local") or join `address`; a session
    already initialised in this process is reused. Returns the `ray` module."""
    try:
        import ray
    except ImportError:
        raise ValueError("Ray is not installed: pip install 'ray>=2.9'") from None
    if ray.is_initialized():
        return ray
    # Measured: without these Ray binds its sockets to the machine's network address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address in (None, "local"):
        # address="local" always starts a new cluster: without it Ray joins whatever cluster
        # /tmp/ray/ray_current_cluster names (one started by `ray start`, even a dead one).
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus or os.cpu_count() or 1,
                 _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return ray
