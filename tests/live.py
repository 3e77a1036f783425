"""Live-daemon tests' shared parts: the daemon on a thread, and HF transformers as the
reference (greedy tokens of the served checkpoint)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tetris.runtime.deployment import Deployment, deploy
from tetris.runtime.serve_config import ServeConfig
from tetris.runtime.server.runner import ServerThread


@contextmanager
def live_daemon(config: ServeConfig) -> Iterator[tuple[str, Deployment]]:
    """`tetris serve` with `config` on a thread: its URL and deployment, stopped after."""
    deployment = deploy(config)
    try:
        with ServerThread(deployment) as url:
            yield url, deployment
    finally:
        deployment.shutdown()


def hf_model(model_dir: Path) -> Any:
    import transformers

    torch.set_num_threads(1)
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def hf_greedy(hf: Any, eos_ids: Iterable[int], prompt: list[int], max_tokens: int) -> list[int]:
    """HF's greedy continuation of `prompt`, at most `max_tokens`, ending at an EOS."""
    eos = sorted(eos_ids)
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos[0])
    return list(out[0, len(prompt):].tolist())
