"""`tetris trace fetch`: pinned public traces downloaded (here from a loopback HTTP server),
sha256-verified, cached, and then loadable by name."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.test_cli_simulate import run_bad
from tests.trace_files import ARXIV, AZURE, MOONCAKE, mooncake_line
from tetris.cache_dir import CACHE_ENV
from tetris.cli.main import main
from tetris.evaluation import trace_catalog
from tetris.evaluation.trace_catalog import (
    CATALOG,
    PublicTrace,
    TraceFetchError,
    cached_path,
    fetch_trace,
    sha256_of,
)
from tetris.evaluation.workload_spec import load_workload

CONTENT = (mooncake_line(0, 100, 10) + mooncake_line(3000, 300, 30)).encode()


class Mirror:
    """A loopback server of OWNER/REPO/COMMIT/PATH files under `root`, counting requests."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests = 0
        mirror = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                mirror.requests += 1
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                del format, args

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def put(self, trace: PublicTrace, data: bytes) -> None:
        path = self.root / trace.repo / trace.commit / trace.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[Mirror]:
    m = Mirror(tmp_path / "mirror")
    yield m
    m.close()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


def toy_trace(data: bytes = CONTENT, name: str = "toy-mooncake") -> PublicTrace:
    return PublicTrace(name=name, kind="mooncake", repo="someone/traces", commit="a" * 40,
                       path="dir/toy.jsonl", sha256=hashlib.sha256(data).hexdigest(),
                       size=len(data), description="two requests")


def test_fetch_verifies_caches_and_reuses(mirror: Mirror, cache: Path) -> None:
    """The pinned file lands in the cache once; a second fetch re-hashes it and stays off the
    network."""
    trace = toy_trace()
    mirror.put(trace, CONTENT)
    path = fetch_trace(trace, base_url=mirror.url)
    assert path == cached_path(trace) and path.read_bytes() == CONTENT
    assert path.is_relative_to(cache / "traces")
    assert fetch_trace(trace, base_url=mirror.url) == path
    assert mirror.requests == 1


@pytest.mark.parametrize("served", [CONTENT[:-1] + b"X", CONTENT + b"more", CONTENT[:10]])
def test_a_file_that_is_not_the_pinned_one_is_never_cached(
        mirror: Mirror, cache: Path, served: bytes) -> None:
    """Changed, longer or cut-short content: an error naming both hashes or sizes, and the
    cache holds nothing (no partial file either)."""
    trace = toy_trace()
    mirror.put(trace, served)
    with pytest.raises(TraceFetchError, match=r"pinned|expected"):
        fetch_trace(trace, base_url=mirror.url)
    folder = cached_path(trace).parent
    assert not folder.exists() or list(folder.iterdir()) == []


def test_unreachable_server_is_one_clear_error(cache: Path) -> None:
    """Nothing listening: a TraceFetchError naming the URL."""
    trace = toy_trace()
    with pytest.raises(TraceFetchError, match=r"http://127\.0\.0\.1:9/someone/traces"):
        fetch_trace(trace, base_url="http://127.0.0.1:9", timeout_s=2)


def test_cli_fetch_then_trace_by_name(mirror: Mirror, cache: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`tetris trace fetch NAME --base-url` prints the cached path; then `--trace NAME` and
    `paired=NAME` load it; before the fetch, the name says how to fetch it."""
    trace = toy_trace()
    monkeypatch.setitem(CATALOG, trace.name, trace)
    mirror.put(trace, CONTENT)
    line = run_bad(capsys, "simulate", "--trace", trace.name, "--policy", "tetris-greedy")
    assert f"run `tetris trace fetch {trace.name}`" in line
    assert main(["trace", "fetch", trace.name, "--base-url", mirror.url]) == 0
    assert capsys.readouterr().out.strip() == str(cached_path(trace))
    workload = load_workload(trace.name)
    assert [r.prompt_tokens for r in workload.requests] == [100, 300]
    paired = load_workload(f"synthetic:n=5,rate=1,paired={trace.name},seed=1")
    assert {r.prompt_tokens for r in paired.requests} <= {100, 300}


def test_cli_refuses_unknown_names_and_reports_download_failures(
        cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown name is a usage error (2) listing the known ones; a failed download exits 1
    with one line."""
    line = run_bad(capsys, "trace", "fetch", "no-such-trace")
    assert "mooncake-conversation" in line
    rc = main(["trace", "fetch", "azure-conv", "--base-url", "http://127.0.0.1:9",
               "--timeout-s", "2"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.splitlines()) == 1 and "Traceback" not in err


def test_lengths_only_trace_by_name_points_to_paired(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lengths-only trace named as a whole workload says to use it as paired=NAME."""
    trace = PublicTrace(**{**toy_trace().__dict__, "name": "toy-lengths", "kind": "lengths"})
    monkeypatch.setitem(CATALOG, trace.name, trace)
    target = cached_path(trace)
    target.parent.mkdir(parents=True)
    target.write_bytes(CONTENT)
    with pytest.raises(ValueError, match="paired=toy-lengths"):
        load_workload(trace.name)


@pytest.mark.parametrize(("name", "local"), [("mooncake-conversation", MOONCAKE),
                                             ("azure-conv", AZURE),
                                             ("arxiv-summarization", ARXIV)])
def test_pins_match_the_shared_copies_and_fetch_through_a_mirror(
        mirror: Mirror, cache: Path, name: str, local: Path) -> None:
    """Each catalog pin (size, sha256) is the upstream file's — the shared copies are
    byte-for-byte upstream — and the real entry fetches from a mirror laid out like GitHub's
    raw host."""
    if not local.is_file():
        pytest.skip("shared traces absent")
    trace = CATALOG[name]
    assert local.stat().st_size == trace.size and sha256_of(local) == trace.sha256
    mirror.put(trace, local.read_bytes())
    assert trace_catalog.fetch_trace(trace, base_url=mirror.url).read_bytes() == \
        local.read_bytes()
