"""Network exposure of the default local mode: every TCP listener of the Ray processes, the
workers' gloo/TCP-store sockets and the daemon is on loopback, and the private Ray refuses a
driver without its token. The socket table is read from /proc (Linux only)."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(),
                                reason="reads the Linux socket table in /proc")


@dataclass(frozen=True)
class Listener:
    pid: int
    comm: str
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.comm}[{self.pid}] {self.ip}:{self.port}"


def _ppids() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # the process ended while we walked
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def process_tree(root: int) -> set[int]:
    """`root` and every process whose parent chain leads to it (Ray's gcs_server, raylet,
    agents and workers are all descendants of the driver that started the cluster)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _ppids().items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree


def _decode(hex_addr: str) -> tuple[str, int]:
    """/proc/net/tcp{,6} "ADDR:PORT": the address as 32-bit words in host (little-endian)
    byte order."""
    addr, port = hex_addr.split(":")
    raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}", int(port, 16)
    return str(ip), int(port, 16)


def _listening_inodes() -> dict[int, tuple[str, int]]:
    inodes: dict[int, tuple[str, int]] = {}
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                inodes[int(fields[9])] = _decode(fields[1])
    return inodes


def listeners(pids: set[int]) -> list[Listener]:
    """Every TCP listening socket held open by one of `pids`."""
    inodes = _listening_inodes()
    found: set[Listener] = set()
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes:
                    found.add(Listener(pid, comm, *inodes[inode]))
    return sorted(found, key=lambda item: (item.pid, item.port))


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # gRPC's dual-stack sockets bound to 127.0.0.1 show as ::ffff:127.0.0.1.
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def exposed(found: list[Listener]) -> list[str]:
    return [str(item) for item in found if not is_loopback(item.ip)]


@pytest.fixture(scope="module")
def probe_actor(ray_session: Any) -> Iterator[int]:
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    actor = Probe.remote()  # type: ignore[attr-defined]
    yield int(ray.get(actor.pid.remote()))
    ray.kill(actor)


def test_every_ray_listener_is_on_loopback(ray_session: Any, probe_actor: int) -> None:
    tree = process_tree(os.getpid())
    assert probe_actor in tree
    found = listeners(tree)
    names = {item.comm for item in found}
    # Not vacuous: the cluster's own servers and the actor's core worker are in the table.
    assert {"gcs_server", "raylet"} <= names, found
    assert any(item.pid == probe_actor for item in found), found
    assert exposed(found) == [], "\n".join(str(item) for item in found)
    assert is_loopback(str(ray_session.util.get_node_ip_address()))


_JOIN = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_keys(b"", namespace=None, timeout=10)
except Exception as err:
    print("REFUSED", type(err).__name__)
else:
    print("JOINED")
"""


def _join(gcs_address: str, env: dict[str, str]) -> str:
    reply = subprocess.run([sys.executable, "-c", _JOIN, gcs_address], env=env,
                           capture_output=True, text=True, timeout=120)
    return reply.stdout.strip().splitlines()[-1] if reply.stdout.strip() else reply.stderr


def test_the_private_ray_refuses_a_client_without_its_token(ray_session: Any) -> None:
    ray = ray_session
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        pytest.skip("token authentication is off (Ray < 2.52, or RAY_AUTH_MODE=disabled)")
    gcs = ray.get_runtime_context().gcs_address
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    # No token at all, then a well-formed wrong one; ~/.ray/auth_token must not rescue either.
    assert _join(gcs, base | {"RAY_AUTH_MODE": "disabled"}).startswith("REFUSED")
    assert _join(gcs, base | {"RAY_AUTH_MODE": "token",
                              "RAY_AUTH_TOKEN": "0" * 64}).startswith("REFUSED")
    # Control: with the session's token the same client gets in.
    assert _join(gcs, dict(os.environ)) == "JOINED"


def _status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10):
            return 200
    except urllib.error.HTTPError as err:
        return err.code


def test_the_runtime_env_agent_wants_the_token(ray_session: Any, probe_actor: int) -> None:
    """The agent that installs packages on the node (an HTTP server, outside gRPC) answers
    401 without the token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        pytest.skip("token authentication is off (Ray < 2.52, or RAY_AUTH_MODE=disabled)")
    agents = [item for item in listeners(process_tree(os.getpid()))
              if item.comm.startswith("ray::RuntimeEnv")]
    if not agents:
        pytest.skip("this Ray starts no runtime env agent HTTP server")
    host = f"[{agents[0].ip}]" if ":" in agents[0].ip else agents[0].ip
    url = f"http://{host}:{agents[0].port}/"
    assert _status(url, {}) == 401
    secret = os.environ.get("RAY_AUTH_TOKEN") or Path(
        os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    token = {"Authorization": f"Bearer {secret}"}
    assert _status(url, token) != 401


def _chat(url: str, model: str, content: str) -> None:
    body = json.dumps({"model": model, "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": content}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        assert reply.status == 200


def test_the_whole_daemon_listens_on_loopback_only(ray_session: Any) -> None:
    """The live daemon (embedded SmolLM2, 2 prefill + 1 decode actors): after a prompt long
    enough to be prefilled by both prefill instances (so their gloo group exists), no process
    of the daemon's tree listens beyond loopback; the TCP store of the workers' world included."""
    pytest.importorskip("transformers")
    from tetris.runtime.deployment import deploy
    from tetris.runtime.ports import free_port
    from tetris.runtime.serve_config import ServeConfig
    from tetris.runtime.server.demo import demo_messages
    from tetris.runtime.server.runner import ServerThread

    config = ServeConfig(port=free_port(), max_queue=4, kv_tokens_per_instance=4096)
    deployment = deploy(config)
    try:
        with ServerThread(deployment) as url:
            _chat(url, deployment.engine.model_name, demo_messages()[0]["content"])
            found = listeners(process_tree(os.getpid()))
            # `load` is idempotent and answers its process id: every instance's process is
            # in the table (its core worker, gloo pairs and, on rank 0, the TCP store).
            pool = deployment.pool
            actors = ray_session.get([a.load.remote() for a in [*pool.prefill, *pool.decode]])
            assert set(actors) <= {item.pid for item in found}, (actors, found)
            assert any(item.port == config.port for item in found), found
            assert exposed(found) == [], "\n".join(str(item) for item in found)
    finally:
        deployment.shutdown()
