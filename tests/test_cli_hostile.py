"""Hostile input through `tetris.cli.main.main`: bad trace, config, requests and calibration
files and out-of-range arguments exit with status 2 and one `tetris: error:` line on stderr,
naming the file (and line) or the option — never a traceback, never after a long run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.test_parser_fuzz import AZURE_TEXT, corrupted, mooncake_text, write
from tetris.cli.main import main

CLI_FUZZ = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


def run_bad(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == "" and "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tetris: error: "), err
    return lines[0]


@pytest.mark.parametrize(("record", "field"), [
    ({"timestamp": 0, "input_length": 10**23, "output_length": 5}, "input_length"),
    ({"timestamp": 10**23, "input_length": 10, "output_length": 5}, "timestamp"),
    ({"timestamp": 0, "input_length": 10, "output_length": -(10**23)}, "output_length"),
])
def test_cli_huge_mooncake_numbers(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                   record: dict[str, int], field: str) -> None:
    """Numbers past int64 were an OverflowError traceback; now one line at FILE:LINE."""
    path = write(tmp_path, "big.jsonl", (mooncake_text(1) + json.dumps(record) + "\n").encode())
    line = run_bad(capsys, "simulate", "--trace", f"mooncake:{path}")
    assert f"{path}:2: {field} must be an integer" in line


@pytest.mark.parametrize("length", ["fixed(100000000000000000000000)", "fixed(1e23)",
                                    "uniform(lo=1;hi=1e30)", "lognormal(median=1e300;sigma=1e300)"])
def test_cli_huge_synthetic_lengths(capsys: pytest.CaptureFixture[str], length: str) -> None:
    line = run_bad(capsys, "simulate", "--trace",
                   f"synthetic:n=5,rate=1,prompt={length},output=fixed(5)")
    assert "--trace" in line and "Warning" not in line


def test_cli_invalid_utf8_trace(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write(tmp_path, "u.csv", AZURE_TEXT.encode() + b"2023-11-16 18:15:51.0,3\xff,4\n")
    line = run_bad(capsys, "simulate", "--trace", str(path))
    assert f"{path}:4: not UTF-8 text" in line


def test_cli_static_sp_of_an_unchosen_policy(capsys: pytest.CaptureFixture[str]) -> None:
    """tetris-greedy on 2 prefill instances runs; static-sp there fails without pydantic's
    "Value error," prefix."""
    trace = "synthetic:n=4,rate=1,prompt=fixed(512),output=fixed(2)"
    assert main(["simulate", "--trace", trace, "--policy", "tetris-greedy", "--model",
                 "llama3-8b", "--prefill-instances", "2", "--format", "json"]) == 0
    capsys.readouterr()
    line = run_bad(capsys, "simulate", "--trace", trace, "--policy", "static-sp",
                   "--prefill-instances", "2")
    assert line == ("tetris: error: --policy static-sp: static_sp (4) exceeds the 2 prefill "
                    "instances")


def is_utf8(data: bytes) -> bool:
    # b"\x80" alone is invalid, but inside b"\xc2\x80" it is a valid character.
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@CLI_FUZZ
@given(data=corrupted(mooncake_text()).filter(lambda d: not is_utf8(d)))
def test_cli_corrupt_trace_fuzz(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                data: bytes) -> None:
    """Invalid UTF-8 anywhere in a trace: exit 2, one line naming the file."""
    path = write(tmp_path, "c.jsonl", data)
    assert str(path) in run_bad(capsys, "simulate", "--trace", f"mooncake:{path}")


@pytest.mark.parametrize("command", ["simulate", "whatif"])
@pytest.mark.parametrize(("text", "where"), [
    (b'{"prefill_instances": NaN}', ":1: not valid JSON: NaN"),
    (b'{\n "noise_cv": 1e400}', ":2: not valid JSON: number 1e400"),
    (b'{"model": "llama3-8b",\n "seed": \xff}', ":2: not UTF-8"),
    (b'{"slo": [1, 2]}', ": slo: expected a JSON object"),
    (b'{"policy": {"static_sp": "x"}}', ": policy.static_sp:"),
    (b'{"prefill_instances": 100000000000}', ": prefill_instances:"),
    (b'{"calibration": "/nonexistent/cal.json"}', ": calibration: /nonexistent/cal.json: cannot"),
    (b'[1]', ": expected a JSON object"),
    (b'{"a": ' * 2000, ": not valid JSON"),
])
def test_cli_bad_sim_config(capsys: pytest.CaptureFixture[str], tmp_path: Path, command: str,
                            text: bytes, where: str) -> None:
    path = write(tmp_path, "c.json", text)
    extra = ["--no-search", "--rates", "1"] if command == "whatif" else []
    line = run_bad(capsys, command, "--trace", "synthetic:n=4,rate=1,prompt=fixed(9),"
                   "output=fixed(2)", "--config", str(path), *extra)
    assert f"{path}{where}" in line


@pytest.mark.parametrize(("text", "where"), [
    (b'{"port": Infinity}', ":1: not valid JSON: Infinity"),
    (b'\xfe{}', ":1: not UTF-8"),
    (b'{"prefill_instances": 0}', ": prefill_instances:"),
    (b'{"calibration": "/nonexistent/cal.json"}', ": calibration: /nonexistent/cal.json: cannot"),
    (b'{"policy": {"time_limit_ms": 1e300}}', "policy.time_limit_ms must be <="),
])
def test_cli_bad_serve_config(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                              tmp_path: Path, text: bytes, where: str) -> None:
    """`tetris serve --config` rejects the file before deploying anything."""
    import tetris.runtime.deployment as deployment

    def no_deploy(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bad config reached deploy()")

    monkeypatch.setattr(deployment, "deploy", no_deploy)
    path = write(tmp_path, "s.json", text)
    line = run_bad(capsys, "serve", "--config", str(path))
    assert where in line and str(path) in line


@pytest.mark.parametrize(("text", "where"), [
    (b'{"prompt_tokens": 10}\n{"prompt_tokens": 10, "arrival_s": 1e308}\n', ":2: arrival_s"),
    (b'{"prompt_tokens": 10, "ttft_slo_s": 1e-320}\n', ":1: ttft_slo_s"),
    (b'{"prompt_tokens": 10}\n\n{"prompt_tokens": NaN}\n', ":3: not valid JSON: NaN"),
    (b'{"prompt_tokens": 10, "request_id": "\xff"}\n', ":1: not UTF-8"),
    (b'{"prompt_tokens": 1' + b"0" * 200 + b"}\n", ":1: not valid JSON: integer"),
])
def test_cli_bad_plan_requests(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               text: bytes, where: str) -> None:
    path = write(tmp_path, "r.jsonl", text)
    line = run_bad(capsys, "plan", "--requests", str(path), "--solver", "greedy")
    assert f"{path}{where}" in line


@pytest.mark.parametrize("args", [
    ["plan", "--request", "100@1e308"],
    ["plan", "--request", "100", "--availability", "1e308", "--prefill-instances", "1"],
    ["plan", "--request", "100", "--time-limit-ms", "1e300"],
    ["plan", "--request", "100", "--gpu-cost-weight", "1e308"],
    ["plan", "--request", "100", "--ttft-slo", "1e-320"],
    ["simulate", "--trace", "synthetic:n=5,rate=1,arrival=gamma,cv=1e-300,prompt=fixed(9),"
     "output=fixed(2)"],
    ["simulate", "--trace", "synthetic:n=5,rate=1,prompt=fixed(9),output=fixed(2)",
     "--prefill-instances", "100000000000"],
    ["simulate", "--trace", "synthetic:n=5,rate=1,prompt=fixed(9),output=fixed(2)",
     "--noise-cv", "1e300"],
    ["simulate", "--trace", "synthetic:n=5,rate=1,prompt=fixed(9),output=fixed(2)",
     "--ttft-slo", "1e-320", "--policy", "tetris-milp"],
    ["simulate", "--trace", "synthetic:n=5,rate=1,prompt=fixed(9),output=fixed(2)",
     "--trace-seed", "-1"],
    ["simulate", "--trace", "synthetic:n=5,rate=1,prompt=fixed(9),output=fixed(2)",
     "--requests-csv", "/nonexistent/dir/r.csv"],
    ["simulate", "--trace", "synthetic:n=5,rate=1,prompt=fixed(9),output=fixed(2)",
     "--calibration", "/"],
])
def test_cli_hostile_arguments(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    """Each was a traceback (overflow, ZeroDivision, MemoryError, PulpError, OSError) or a
    crash after the run; now exit 2 and one line before any work."""
    run_bad(capsys, *args)
