"""Public traces by name: `tetris trace fetch NAME` downloads the upstream file at a pinned
commit, checks its sha256, and caches it under `<cache root>/traces/` (`tetris.cache_dir`);
`--trace NAME` then loads it from there.

A download goes to a temporary file beside the cached one and is renamed into place only once its
size and sha256 match, so a cut connection or a changed upstream file never leaves a file that a
later run would trust. A cached file is re-hashed before it is reused.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tetris.cache_dir import cache_root

RAW_BASE_URL = "https://raw.githubusercontent.com"
CHUNK_BYTES = 1 << 20


class TraceFetchError(RuntimeError):
    """A trace could not be downloaded, or what arrived is not the pinned file."""


@dataclass(frozen=True)
class PublicTrace:
    name: str
    kind: str  # "mooncake" | "azure" | "lengths" (no arrival times: synthetic paired=NAME)
    repo: str  # owner/name on GitHub
    commit: str  # pinned: the file at this commit is what the sha256 says
    path: str  # inside the repository
    sha256: str
    size: int
    description: str

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def url(self, base_url: str = RAW_BASE_URL) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{self.path}"


CATALOG: dict[str, PublicTrace] = {t.name: t for t in (
    PublicTrace(
        name="mooncake-conversation", kind="mooncake", repo="kvcache-ai/Mooncake",
        commit="3b5a594133958449a1feaf1c9e0fc1b553e34a28",
        path="FAST25-release/traces/conversation_trace.jsonl",
        sha256="b8cbb061a85206d729d91cdc2981f43c9e0d99209dce588d3af5f7934408b9df",
        size=3_029_533,
        description="Mooncake FAST'25 conversation trace: 12,031 requests over 1 h of Kimi "
        "traffic, with 512-token prefix-block hashes (Apache-2.0)"),
    PublicTrace(
        name="azure-conv", kind="azure", repo="Azure/AzurePublicDataset",
        commit="b469a113cedca53ddc3bdea71a143dc4b7d8700c",
        path="data/AzureLLMInferenceTrace_conv.csv",
        sha256="2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8",
        size=719_188,
        description="Azure LLM inference trace 2023, conversation service: 19,366 requests "
        "over 1 h (CC-BY-4.0; cite Splitwise, ISCA 2024)"),
    PublicTrace(
        name="arxiv-summarization", kind="lengths", repo="microsoft/vidur",
        commit="7d47513363ec447a741ac5e47241580b47724fbf",
        path="data/processed_traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
        sha256="9d3580538d915ca75e4aaaa54590b42dbb17abc6d74c8913310cf07c232adcdc",
        size=884_932,
        description="arXiv summarization (prompt, output) lengths, Llama-2 tokenizer, 28,257 "
        "rows, no arrivals (vidur, MIT)"),
)}


def public_trace(name: str) -> PublicTrace | None:
    return CATALOG.get(name.lower())


def traces_dir(root: Path | None = None) -> Path:
    return (root or cache_root()) / "traces"


def cached_path(trace: PublicTrace, root: Path | None = None) -> Path:
    return traces_dir(root) / trace.name / trace.file_name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def is_fetched(trace: PublicTrace, root: Path | None = None) -> bool:
    path = cached_path(trace, root)
    return path.is_file() and path.stat().st_size == trace.size and \
        sha256_of(path) == trace.sha256


def fetched_path(name: str, root: Path | None = None) -> Path:
    """The cached file of a catalog trace; a ValueError saying how to fetch it otherwise."""
    trace = public_trace(name)
    if trace is None:
        raise ValueError(f"unknown trace {name!r} (known: {', '.join(CATALOG)})")
    if not is_fetched(trace, root):
        raise ValueError(f"trace {trace.name!r} is not fetched (or its cached file does not "
                         f"match its sha256): run `tetris trace fetch {trace.name}`")
    return cached_path(trace, root)


def local_path(text: str) -> Path:
    """A file path, or a fetched public trace's cached file when `text` names one and no such
    file exists here."""
    path = Path(text)
    if not path.exists() and public_trace(text) is not None:
        return fetched_path(text)
    return path


def fetch_trace(trace: PublicTrace, *, root: Path | None = None,
                base_url: str = RAW_BASE_URL, timeout_s: float = 60.0) -> Path:
    """The trace's verified cached file, downloaded first unless already there."""
    target = cached_path(trace, root)
    if is_fetched(trace, root):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = trace.url(base_url)
    fd, tmp_name = tempfile.mkstemp(prefix=".part-", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as r:
            while block := r.read(CHUNK_BYTES):
                size += len(block)
                if size > trace.size:
                    raise TraceFetchError(f"{url}: more than the pinned {trace.size:,} bytes "
                                          "arrived; the upstream file is not the pinned one")
                digest.update(block)
                out.write(block)
        if size != trace.size or digest.hexdigest() != trace.sha256:
            raise TraceFetchError(
                f"{url}: got {size:,} bytes with sha256 {digest.hexdigest()}, expected "
                f"{trace.size:,} bytes with sha256 {trace.sha256}; nothing was cached")
        tmp.replace(target)
    except (urllib.error.URLError, OSError) as exc:
        raise TraceFetchError(f"{url}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target
