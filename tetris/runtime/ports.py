"""A free TCP port on loopback (for a process group's store, or a test server)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it; it may be taken again later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
