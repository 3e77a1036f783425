"""Weights into `LlamaModel`: from an HF checkpoint dir, or from a GGUF file via a cached HF dir.

An HF dir is config.json plus `model.safetensors` or shards named by `model.safetensors.index.json`,
with HF parameter names (`model.layers.{i}.self_attn.q_proj.weight`, ...). A GGUF file is
dequantized once by transformers and written as such a dir (`convert_gguf`), so later loads are
plain safetensors reads; the dir also loads in `transformers.AutoModelForCausalLM`, the reference
the tests compare against on the very same weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tetris.models.config import LlamaConfig, read_config
from tetris.models.llama import LlamaModel

__all__ = ["WeightsError", "convert_gguf", "file_sha256", "load_model", "load_state_dict",
           "read_config", "safetensors_files"]

INDEX_FILE = "model.safetensors.index.json"
SOURCE_FILE = "tetris_source.json"  # provenance of a converted dir (which GGUF, which converter)


class WeightsError(ValueError):
    """A checkpoint that cannot be loaded: missing files, names or shapes that do not fit."""


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of `model_dir`: the shards its index names, else every *.safetensors."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise WeightsError(f"{index}: not a safetensors index ({err})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WeightsError(f"{model_dir}: shards named by {INDEX_FILE} are missing: "
                               f"{', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_dir} holds no *.safetensors weights")
    return files


def _our_name(hf_name: str, config: LlamaConfig) -> str | None:
    """HF parameter name -> LlamaModel's, or None for tensors we do not keep."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None  # old checkpoints saved the RoPE table; we compute it from the config
    if hf_name == "lm_head.weight":
        # Tied checkpoints may still carry a copy; HF ignores it in favour of the embedding.
        return None if config.tie_word_embeddings else hf_name
    return hf_name.removeprefix("model.")


def load_state_dict(model_dir: Path, config: LlamaConfig, *, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """LlamaModel's state dict read from `model_dir`, every name and shape checked."""
    from safetensors import safe_open

    with torch.device("meta"):
        expected = LlamaModel(config).state_dict()
    state: dict[str, Tensor] = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                name = _our_name(hf_name, config)
                if name is None:
                    continue
                if name not in expected:
                    raise WeightsError(f"{path.name}: unexpected tensor {hf_name!r} for a "
                                       f"{config.model_type} config")
                tensor = f.get_tensor(hf_name)
                if tensor.shape != expected[name].shape:
                    raise WeightsError(
                        f"{path.name}: {hf_name} has shape {tuple(tensor.shape)}, the config "
                        f"implies {tuple(expected[name].shape)}"
                    )
                state[name] = tensor.to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        shown = ", ".join(missing[:4]) + more
        raise WeightsError(f"{model_dir}: checkpoint lacks {shown}")
    return state


def load_model(model_dir: str | Path, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LlamaModel:
    """An HF checkpoint dir -> LlamaModel in eval mode with gradients off."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    state = load_state_dict(model_dir, config, dtype=dtype, device=device)
    # Built on meta and given the loaded tensors: no random init of weights about to be replaced.
    with torch.device("meta"):
        model = LlamaModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _dtype_kwarg() -> dict[str, Any]:
    import transformers

    # transformers renamed `torch_dtype` to `dtype` in 4.56 and warns about the old name since.
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": torch.float32}


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantize `gguf_file` to float32 and write it as an HF dir at `out_dir` (once).

    The dir appears by an atomic rename when complete, so its presence means it is whole and a
    second call returns at once. transformers refuses `save_pretrained` for GGUF-loaded models,
    hence the hand-written safetensors + config.json.
    """
    if (out_dir / "config.json").is_file():
        return out_dir
    if not gguf_file.is_file():
        raise WeightsError(f"GGUF file {gguf_file} does not exist")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"gguf_file": gguf_file.name, "gguf_sha256": file_sha256(gguf_file)}
    where = {"pretrained_model_name_or_path": str(gguf_file.parent), "gguf_file": gguf_file.name}
    model = AutoModelForCausalLM.from_pretrained(**where, **_dtype_kwarg())
    tokenizer = AutoTokenizer.from_pretrained(**where)
    hf_config: dict[str, Any] = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "torch_dtype"):
        hf_config.pop(key, None)
    hf_config["dtype"] = "float32"
    hf_config["architectures"] = [type(model).__name__]
    LlamaConfig.from_hf(hf_config)  # refuse what our model cannot run before writing anything
    state = model.state_dict()
    if hf_config.get("tie_word_embeddings"):
        # safetensors refuses tensors sharing memory; HF re-ties lm_head to the embedding on load.
        state.pop("lm_head.weight", None)
    state = {name: t.detach().contiguous() for name, t in state.items()}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        import transformers

        source["converted_by"] = f"transformers {transformers.__version__}"
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        # mkdtemp makes the dir owner-only (and safetensors its file): a cache is for reading.
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.chmod(0o755)
        os.rename(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out_dir / "config.json").is_file():
            return out_dir  # a concurrent conversion finished first; its result is as good
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
