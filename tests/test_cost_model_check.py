"""`benchmarks/gpu/cost_model_check.py` at tiny shapes: one row per (chunk, prefix) point with a
positive measured time, the cost model's own prediction, and a physical limit below both the
prediction and the preset's own fixed cost; on CUDA (marked) the same at tiny shapes in bf16."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tetris.models.config import named_config
from tetris.solver.cluster import ClusterSpec
from tetris.solver.cost_model import CostModel
from tetris.solver.hardware import load_hardware
from tetris.solver.model_spec import model_spec_of

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "cost_model_check.py"


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cost_model_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object]]:
    rc = script().main(["--shape", "tiny", "--chunks", "8,24", "--prefixes", "0,40",
                        "--repeats", "1", *args])
    return rc, json.loads(capsys.readouterr().out)


def test_tiny_grid_on_cpu_reports_every_point_against_the_preset(
        capsys: pytest.CaptureFixture[str], torch_one_thread: None) -> None:
    """4 points (chunks 8, 24 × prefixes 0, 40); predictions are T(c, p, 1) of the h200 preset
    for the tiny model; limits are at most the predictions; a huge tolerance passes (rc 0), a
    zero one fails (rc 1: the prediction is never exact)."""
    rc, report = run(capsys, "--device", "cpu", "--hardware", "h200", "--tolerance", "1e9")
    assert rc == 0
    cm = CostModel(model_spec_of(named_config("tiny")), load_hardware("h200"),
                   ClusterSpec(prefill_instances=1))
    points = report["points"]
    assert isinstance(points, list)
    assert [(p["chunk"], p["prefix"]) for p in points] == [(8, 0), (24, 0), (8, 40), (24, 40)]
    for p in points:
        assert p["measured_s"] > 0
        assert p["predicted_s"] == pytest.approx(cm.chunk_seconds(p["chunk"], p["prefix"], 1))
        assert 0 < p["limit_s"] <= p["predicted_s"]
    assert report["attention_backend"] == "cpu_flash"
    rc, _ = run(capsys, "--device", "cpu", "--tolerance", "0")
    assert rc == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_grid_on_cuda_runs_in_bf16(capsys: pytest.CaptureFixture[str]) -> None:
    """On CUDA: bf16, the SDPA (or flash-attn) backend, a positive time per point."""
    rc, report = run(capsys, "--device", "cuda", "--tolerance", "1e9")
    assert rc == 0 and report["dtype"] == "bfloat16"
    assert report["attention_backend"] in ("flash_attn", "sdpa_cuda")
