"""`tetris profile` on live Ray actors: a calibration with its fit error, which the simulator
loads; `tetris serve`/`profile` reject bad settings with one line before starting anything."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from tetris.cli.main import main
from tetris.runtime.ports import free_port
from tetris.solver.calibration import Calibration


def test_profile_writes_a_calibration_the_simulator_accepts(
        ray_session: Any, smollm2_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A 2 tokens × 2 prefixes × SP {1,2} grid: 8 prefill rows fitted, errors reported (finite,
    leave-one-out included), decode fitted; `tetris simulate --calibration` runs with it."""
    out = tmp_path / "cal.json"
    rc = main(["profile", "--out", str(out), "--tokens", "16", "96", "--prefixes", "0", "64",
               "--repeats", "1", "--format", "json"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(printed)
    fit = report["prefill_fit"]
    assert fit["num_rows"] == 8 and len(report["rows"]) == 8
    assert {r["sp"] for r in report["rows"]} == {1, 2}
    assert math.isfinite(fit["mean_abs_pct_error"]) and fit["loo_mean_abs_pct_error"] is not None
    assert math.isfinite(report["decode_fit"]["mean_abs_pct_error"])
    calibration = Calibration.load(out)
    assert calibration.hardware == "cpu" and calibration.coefficients.lin_s_per_token > 0
    rc = main(["simulate", "--trace", "synthetic:n=8,rate=1,prompt=uniform(lo=100;hi=900),"
               "output=fixed(4),seed=1", "--model", str(smollm2_dir), "--hardware", "h100",
               "--calibration", str(out), "--format", "json"])
    printed, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(printed)["metrics"]["requests"] == 8


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "--prefill-instances", "0"], "prefill_instances"),
    (["serve", "--config", "/nonexistent.json"], "--config"),
    (["serve", "--model", "/nonexistent-dir"], "not an embedded model"),
])
def test_bad_settings_fail_with_one_line(args: list[str], message: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 and one `tetris: error:` line naming the problem (after the progress line)."""
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith("tetris: error:")]
    assert len(errors) == 1 and message in errors[0]


def test_config_file_and_flags_make_one_serve_config(tmp_path: Path) -> None:
    """--config supplies settings; flags given on the command line override the file."""
    from tetris.cli.main import build_parser
    from tetris.cli.serve_options import serve_config

    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"prefill_instances": 4, "max_queue": 8, "port": 9000,
                                "slo": {"ttft_s": 2.0}}))
    args = build_parser().parse_args(["serve", "--config", str(path), "--port", "9100"])
    config = serve_config(args)
    assert (config.prefill_instances, config.max_queue, config.port) == (4, 8, 9100)
    assert config.slo.ttft_s == 2.0 and config.decode_instances == 1


def test_serve_a_checkpoint_dir_without_calibration(
        ray_session: Any, smollm2_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`tetris serve --model DIR --demo` for a checkpoint with no calibration on this host:
    it measures a quick one on the live actors, then answers the demo's chat request with a
    chunk plan."""
    model = tmp_path / "my-llama"
    model.mkdir()
    for f in smollm2_dir.iterdir():
        (model / f.name).symlink_to(f)
    rc = main(["serve", "--model", str(model), "--demo", "--port", str(free_port())])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "no calibration for my-llama" in err
    assert "Prefill chunk plan:" in out and "on prefill instances" in out
