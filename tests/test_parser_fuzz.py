"""Every parser of a user's file, fuzzed: trace files (Mooncake JSONL, Azure CSV, length CSV),
synthetic workload specs, `tetris plan --requests` JSONL, plan report JSON, the `--config`
files of `tetris simulate`/`whatif` and `tetris serve`, calibration JSON and CSV.

A corrupted file (random bytes, invalid UTF-8, truncation, wrong types, huge / negative / NaN /
infinite numbers, missing and extra fields) either parses or raises the project's ValueError
(UsageError, TraceFormatError, InputFileError, ...) with one line naming the file — and its line
where one exists. Never another exception. The same through `tetris.cli.main.main` (exit
status 2, one stderr line): tests/test_cli_hostile.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tetris.cli.main import build_parser
from tetris.cli.plan_cmd import requests_from_file
from tetris.cli.serve_options import serve_config
from tetris.cli.sim_options import config_from_args
from tetris.evaluation.trace_formats import (
    TraceFormatError,
    load_azure,
    load_lengths,
    load_mooncake,
)
from tetris.evaluation.workload_spec import load_workload
from tetris.solver.calibration import Calibration, read_measurements_csv
from tetris.solver.plan_json import parse_plan_report

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# JSON text that is hostile where a number (or an object) is expected.
HOSTILE_JSON = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 23, "-5", "0",
                "1.5", "true", "null", '"12"', "[]", "{}", "9" * 5000, "[" * 3000,
                "-0", "1e-320", '"\\ud800"']
HOSTILE_CELLS = ["", "-1", "0", "1.5", "nan", "inf", "1" + "0" * 23, "9" * 5000, "x", '"',
                 "\x00", "2023-13-45 99:99:99", "0001-01-01 00:00:00", "9999-12-31 23:59:59"]


def mooncake_text(rows: int = 3) -> str:
    return "".join(json.dumps({"timestamp": 1000 * i, "input_length": 100 + i,
                               "output_length": 5, "hash_ids": [i]}) + "\n"
                   for i in range(rows))


AZURE_TEXT = ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
              "2023-11-16 18:15:50.9951690,396,109\n")
LENGTHS_TEXT = ("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                "3772,54,3826,69.8\n100,5,105,20\n")
REQUESTS_TEXT = ('{"prompt_tokens": 1024, "arrival_s": 0.5, "request_id": "a"}\n'
                 '{"prompt_tokens": 2048, "ttft_slo_s": 2}\n')
SIM_CONFIG = {"model": "llama3-8b", "hardware": "h100", "prefill_instances": 4,
              "decode_instances": 2, "slo": {"ttft_scale": 5, "tbt_s": 0.1},
              "policy": {"static_sp": 2, "time_limit_ms": 20}}
SERVE_CONFIG = {"prefill_instances": 2, "decode_instances": 1, "port": 8123, "max_queue": 8,
                "policy": {"block_tokens": 64}, "slo": {"ttft_s": 2.0}}
CALIBRATION = {"model": "m", "hardware": "cpu",
               "coefficients": {k: 0.001 for k in (
                   "fixed_s", "step_intra_s", "step_inter_s", "lin_s_per_token",
                   "attn_s_per_pair", "comm_intra_s_per_token", "comm_inter_s_per_token",
                   "decode_fixed_s", "decode_kv_s_per_token")},
               "report": {"num_rows": 2, "mean_abs_pct_error": 1.0, "max_abs_pct_error": 2.0,
                          "r_squared": 0.9}}
PLAN = {"solver": {"name": "greedy", "status": "feasible", "wall_ms": 1.0, "objective": 0.5,
                   "bound": None},
        "availability_s": [0.0, 0.0],
        "plans": [{"request_id": "r0", "arrival_s": 0.0, "prompt_tokens": 100,
                   "prefill_end_s": 0.2, "ttft_s": 0.2, "ttft_slo_s": 1.0, "slo_slack_s": 0.8,
                   "chunks": [{"start_token": 0, "end_token": 100, "instances": [0, 1],
                               "start_s": 0.0, "end_s": 0.2}]}]}


# -- corruption strategies ---------------------------------------------------------------------
@st.composite
def corrupted(draw: st.DrawFn, valid: str) -> bytes:
    """`valid` damaged one way: random bytes, a bad UTF-8 byte, cut short, a value replaced
    by a hostile token, a line duplicated with garbage, or emptied."""
    data = valid.encode()
    kind = draw(st.sampled_from(["random", "utf8", "truncate", "token", "splice", "empty"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"\n\n", b"\xef\xbb\xbf", b" "]))
    at = draw(st.integers(0, len(data)))
    if kind == "utf8":
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80", b"\xf8\x88"]))
        return data[:at] + bad + data[at:]
    if kind == "truncate":
        return data[:at]
    if kind == "token":
        # Replace one run of digits (a number of the file) with something hostile.
        digits = [i for i, b in enumerate(data) if chr(b).isdigit()]
        start = draw(st.sampled_from(digits)) if digits else at
        end = start
        while end < len(data) and chr(data[end]).isdigit():
            end += 1
        token = draw(st.sampled_from(HOSTILE_JSON + HOSTILE_CELLS))
        return data[:start] + token.encode("utf-8", "surrogatepass") + data[end:]
    junk = draw(st.text(max_size=40)).encode("utf-8", "surrogatepass")
    return data[:at] + junk + data[at:]


def hostile_value() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from([None, True, -1, 0, 10**23, -(10**23), 1e308, -1e308, 5e-324, 1.5,
                         "x", "", [], {}, [1, 2], {"a": 1}, "\x00"]),
        st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))


@st.composite
def mutated_object(draw: st.DrawFn, valid: dict[str, Any]) -> bytes:
    """`valid` as JSON with a field (maybe nested) wrong-typed, hostile, missing or extra, or
    its text corrupted; NaN / Infinity appear as the JSON-ish tokens Python writes."""
    data: dict[str, Any] = json.loads(json.dumps(valid))
    target = data
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    use_nested: bool = draw(st.booleans())
    if nested and use_nested:
        target = data[draw(st.sampled_from(nested))]
    kind = draw(st.sampled_from(["set", "drop", "extra", "text", "nonfinite"]))
    key = draw(st.sampled_from(sorted(target))) if target else "x"
    if kind == "set":
        target[key] = draw(hostile_value())
    elif kind == "drop":
        target.pop(key, None)
    elif kind == "extra":
        target[draw(st.text(min_size=1, max_size=10))] = draw(hostile_value())
    elif kind == "nonfinite":
        target[key] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    else:
        return draw(corrupted(json.dumps(valid, indent=1)))
    return json.dumps(data, indent=1).encode()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def assert_clean(err: BaseException, path: Path) -> None:
    """One line, naming the file; PATH:LINE: when the error knows its line."""
    message = str(err)
    assert isinstance(err, ValueError), repr(err)
    assert "\n" not in message and len(message) < 600, message
    assert str(path) in message, message
    line = getattr(err, "line", None)
    if line is not None:
        assert message.startswith(f"{path}:{line}: "), message


def parses_or_fails_cleanly(load: Any, path: Path, *args: Any) -> None:
    try:
        load(path, *args)
    except ValueError as err:
        assert_clean(err, path)


# -- trace files -------------------------------------------------------------------------------
@FUZZ
@given(data=corrupted(mooncake_text()))
def test_mooncake_fuzz(tmp_path: Path, data: bytes) -> None:
    parses_or_fails_cleanly(load_mooncake, write(tmp_path, "t.jsonl", data))


@FUZZ
@given(data=corrupted(AZURE_TEXT))
def test_azure_fuzz(tmp_path: Path, data: bytes) -> None:
    parses_or_fails_cleanly(load_azure, write(tmp_path, "t.csv", data))


@FUZZ
@given(data=corrupted(LENGTHS_TEXT))
def test_lengths_fuzz(tmp_path: Path, data: bytes) -> None:
    parses_or_fails_cleanly(load_lengths, write(tmp_path, "l.csv", data))


@FUZZ
@given(data=st.one_of(corrupted(mooncake_text()), corrupted(AZURE_TEXT)),
       suffix=st.sampled_from([".jsonl", ".csv"]))
def test_load_workload_by_content_fuzz(tmp_path: Path, data: bytes, suffix: str) -> None:
    """A bare PATH is sniffed by suffix and header: the sniffing fails cleanly too."""
    path = write(tmp_path, "w" + suffix, data)
    try:
        load_workload(str(path))
    except ValueError as err:
        assert "\n" not in str(err) and str(path) in str(err), err


LENGTHS = ["fixed({})", "uniform(lo=1;hi={})", "zipf(a=1.1;max={})", "zipf(a={};max=9)",
           "lognormal(median={};sigma=1)", "lognormal(median=100;sigma={})",
           "lognormal(median=100;sigma=1;max={})"]
NUMBERS = ["0", "-1", "1", "1e23", "1" + "0" * 23, "nan", "inf", "-inf", "1e-320", "1.5",
           "1e308", "x", "", "9" * 5000, "2147483648", "2147483647"]


@FUZZ
@given(n=st.sampled_from([*NUMBERS, "5"]), rate=st.sampled_from([*NUMBERS, "2"]),
       prompt=st.sampled_from(LENGTHS), value=st.sampled_from(NUMBERS),
       arrival=st.sampled_from(["poisson", "gamma", "constant", "weibull"]),
       cv=st.sampled_from([None, *NUMBERS]), seed=st.sampled_from([None, *NUMBERS]))
def test_synthetic_spec_fuzz(n: str, rate: str, prompt: str, value: str, arrival: str,
                             cv: str | None, seed: str | None) -> None:
    """Synthetic specs with hostile numbers: a workload or one WorkloadSpecError line."""
    spec = (f"synthetic:n={n},rate={rate},arrival={arrival},prompt={prompt.format(value)},"
            "output=fixed(3)" + (f",cv={cv}" if cv is not None else "")
            + (f",seed={seed}" if seed is not None else ""))
    try:
        workload = load_workload(spec)
    except ValueError as err:
        assert "\n" not in str(err) and len(str(err)) < 1000, err
        return
    assert all(r.prompt_tokens >= 1 for r in workload.requests)


# -- plan requests and plan reports ------------------------------------------------------------
@FUZZ
@given(data=st.one_of(corrupted(REQUESTS_TEXT),
                      mutated_object({"prompt_tokens": 1024, "arrival_s": 0.5,
                                      "request_id": "a", "ttft_slo_s": 2.0})))
def test_plan_requests_fuzz(tmp_path: Path, data: bytes) -> None:
    """`tetris plan --requests`: the request lines it accepts are in range."""
    path = write(tmp_path, "r.jsonl", data.replace(b"\n", b" "))  # one JSON object a line
    try:
        requests = requests_from_file(path)
    except ValueError as err:
        assert "\n" not in str(err) and str(path) in str(err), err
        return
    assert all(r.prompt_tokens > 0 and abs(r.arrival_s) <= 1e9 for r in requests)


@FUZZ
@given(data=mutated_object(PLAN))
def test_plan_report_fuzz(data: bytes) -> None:
    """The plan JSON that `tetris plan --from-server` reads: a report or one clean line."""
    try:
        report = parse_plan_report(data, "http://server/plan")
    except ValueError as err:
        assert "\n" not in str(err) and str(err).startswith("http://server/plan: "), err
        return
    for plan in report.plans:
        assert all(0 <= g < report.num_instances for c in plan.chunks for g in c.instances)


# -- configuration and calibration files -------------------------------------------------------
def sim_args(config: Path) -> argparse.Namespace:
    return build_parser().parse_args(["simulate", "--trace", "unused", "--config", str(config)])


@FUZZ
@given(data=mutated_object(SIM_CONFIG))
def test_sim_config_fuzz(tmp_path: Path, data: bytes) -> None:
    """`tetris simulate/whatif --config`: a SimConfig or one UsageError naming the file."""
    path = write(tmp_path, "sim.json", data)
    try:
        config_from_args(sim_args(path))
    except ValueError as err:
        assert "\n" not in str(err) and str(path) in str(err), err


@FUZZ
@given(data=mutated_object(SERVE_CONFIG))
def test_serve_config_fuzz(tmp_path: Path, data: bytes) -> None:
    """`tetris serve --config` (parsing only: nothing starts)."""
    path = write(tmp_path, "serve.json", data)
    try:
        serve_config(build_parser().parse_args(["serve", "--config", str(path)]))
    except ValueError as err:
        assert "\n" not in str(err) and str(path) in str(err), err


@FUZZ
@given(data=mutated_object(CALIBRATION))
def test_calibration_json_fuzz(tmp_path: Path, data: bytes) -> None:
    """A calibration either loads with finite coefficients or fails naming the file."""
    path = write(tmp_path, "cal.json", data)
    try:
        calibration = Calibration.load(path)
    except ValueError as err:
        assert_clean(err, path)
        return
    assert all(0 <= v < 1e3 for v in calibration.coefficients.model_dump().values())


@FUZZ
@given(data=corrupted("tokens,prefix,sp,seconds,cross_node\n128,0,1,0.01,0\n256,64,2,0.02,1\n"))
def test_calibration_csv_fuzz(tmp_path: Path, data: bytes) -> None:
    parses_or_fails_cleanly(read_measurements_csv, write(tmp_path, "m.csv", data))


@pytest.mark.parametrize("make", [lambda p: p / "missing.json", lambda p: p])
def test_unreadable_paths_name_the_file(tmp_path: Path, make: Any) -> None:
    """A missing file or a directory: the same one line from every loader."""
    path = make(tmp_path)
    for load in (load_mooncake, load_azure, load_lengths, Calibration.load):
        with pytest.raises(ValueError, match="cannot read") as info:
            load(path)
        assert_clean(info.value, path)


def test_invalid_utf8_names_file_and_line(tmp_path: Path) -> None:
    """The line of the first bad byte, not a codec position."""
    path = write(tmp_path, "t.jsonl", mooncake_text(2).encode() + b'{"timestamp": \xff}\n')
    with pytest.raises(TraceFormatError, match=r"t\.jsonl:3: not UTF-8 text") as info:
        load_mooncake(path)
    assert info.value.line == 3
