"""`tetris simulate` and `tetris whatif` end to end, in-process, on small synthetic workloads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tetris.cli.main import main

TRACE = ("synthetic:n=40,rate=2,prompt=uniform(lo=1000;hi=8000),"
         "output=uniform(lo=3;hi=12),seed=1")
CLUSTER = ["--model", "llama3-8b", "--hardware", "h100", "--prefill-instances", "3",
           "--decode-instances", "2", "--static-sp", "2", "--distserve-group", "1"]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    rc = main([*args, "--format", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    parsed: dict[str, Any] = json.loads(out)
    return parsed


def run_bad(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("policy", ["tetris", "tetris-greedy", "loongserve", "distserve",
                                    "static-sp"])
def test_simulate_json_has_metrics_for_every_policy(
        capsys: pytest.CaptureFixture[str], policy: str) -> None:
    """Each policy runs the workload to completion and reports metrics and validated plans."""
    out = run_json(capsys, "simulate", "--trace", TRACE, "--policy", policy, *CLUSTER)
    m = out["metrics"]
    assert m["requests"] == m["finished"] == 40
    assert 0.0 <= m["slo_attainment"] <= 1.0
    assert m["ttft_p50_s"] <= m["ttft_p90_s"] <= m["ttft_p99_s"]
    if policy != "loongserve":
        assert out["stats"]["plans_validated"] >= 40


def test_simulate_writes_requests_chrome_trace_and_gantt(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Per-request CSV (one row per request), a Chrome trace and a Gantt PNG are written."""
    csv_path, trace, gantt = tmp_path / "r.csv", tmp_path / "t.json", tmp_path / "g.png"
    run_json(capsys, "simulate", "--trace", TRACE, "--policy", "tetris-greedy", *CLUSTER,
             "--requests-csv", str(csv_path), "--chrome-trace", str(trace), "--gantt",
             str(gantt), "--gantt-window", "0:5")
    assert len(csv_path.read_text().splitlines()) == 41
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("cat") == "prefill" for e in events)
    assert gantt.stat().st_size > 1000


def test_simulate_rate_scales_the_trace(capsys: pytest.CaptureFixture[str]) -> None:
    """--rate time-scales the trace to that mean rate and says so in the notes."""
    out = run_json(capsys, "simulate", "--trace", TRACE, "--policy", "tetris-greedy", *CLUSTER,
                   "--rate", "5")
    assert out["trace"]["mean_rate_rps"] == pytest.approx(5.0)
    assert any("5" in n for n in out["trace"]["notes"])


def test_simulate_bad_inputs_exit_2_with_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Missing file, malformed trace line, bad config each give one clear line."""
    assert "--trace" in run_bad(capsys, "simulate", "--trace", str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n'
                   '{"timestamp": 5, "input_length": -3, "output_length": 2, "hash_ids": []}\n')
    assert ":2:" in run_bad(capsys, "simulate", "--trace", f"mooncake:{bad}")
    line = run_bad(capsys, "simulate", "--trace", TRACE, "--policy", "static-sp",
                   "--prefill-instances", "2", "--static-sp", "4")
    assert line == ("tetris: error: --policy static-sp: static_sp (4) exceeds the 2 prefill "
                    "instances\n")
    assert "--gantt" in run_bad(capsys, "simulate", "--trace", TRACE, "--gantt", "x.pdf")


@pytest.mark.parametrize("command", ["simulate", "whatif"])
def test_settings_of_a_policy_not_run_are_not_checked(
        capsys: pytest.CaptureFixture[str], command: str) -> None:
    """static_sp (default 4) does not have to fit 2 prefill instances unless static-sp runs."""
    extra = ["--no-search", "--rates", "2"] if command == "whatif" else []
    out = run_json(capsys, command, "--trace", TRACE, "--policy", "tetris-greedy",
                   "--model", "llama3-8b", "--prefill-instances", "2", "--decode-instances",
                   "2", *extra)
    assert out["cluster"]["prefill_instances"] == 2


def test_whatif_sweep_checks_each_policy_at_each_point(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A swept cluster too small for a policy's own setting fails before any simulation."""
    line = run_bad(capsys, "whatif", "--trace", TRACE, "--policy", "static-sp", "--no-search",
                   "--rates", "1", "--sweep", "prefill_instances=2,4")
    assert "static_sp (4) exceeds the 2 prefill instances" in line
    assert "Value error" not in line and '{"prefill_instances": 2}' in line


def test_whatif_json_contract_and_at_rate_of(capsys: pytest.CaptureFixture[str]) -> None:
    """Max rate per policy with its bracket, and metrics at the reference policy's max rate."""
    out = run_json(capsys, "whatif", "--trace", TRACE, *CLUSTER, "--policy", "tetris-greedy",
                   "--policy", "static-sp", "--at-rate-of", "static-sp", "--max-evals", "6",
                   "--rel-tol", "0.2")
    assert {"trace", "slo", "cluster", "policies"} <= set(out)
    ref = out["policies"]["static-sp"]["max_sustainable_rate_rps"]
    for name in ("tetris-greedy", "static-sp"):
        res = out["policies"][name]
        assert res["max_sustainable_rate_rps"] is not None
        lo, hi = res["search"]["bracket_rps"]
        assert lo == res["max_sustainable_rate_rps"] and (hi is None or hi > lo)
        row = res["at_rates"][-1]
        assert row["at_rate_of"] == "static-sp" and row["rate_rps"] == pytest.approx(ref)
        assert {"rate_rps", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s",
                "slo_attainment"} <= set(row)


def test_whatif_sweep_and_rates(capsys: pytest.CaptureFixture[str]) -> None:
    """A sweep over prefill instances reports each point; --rates adds fixed-rate rows."""
    out = run_json(capsys, "whatif", "--trace", TRACE, *CLUSTER, "--policy", "tetris-greedy",
                   "--no-search", "--rates", "1,4", "--sweep", "prefill_instances=2,3")
    assert [s["point"] for s in out["sweep"]] == [{"prefill_instances": 2},
                                                  {"prefill_instances": 3}]
    rows = out["sweep"][0]["policies"]["tetris-greedy"]["at_rates"]
    assert [r["rate_rps"] for r in rows] == [1.0, 4.0]


def test_whatif_min_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    """Fewest GPUs that sustain a low rate is small and reported with its split."""
    out = run_json(capsys, "whatif", "--trace", TRACE, *CLUSTER, "--policy", "tetris-greedy",
                   "--no-search", "--min-gpus-for", "0.5", "--max-gpus", "8")
    res = out["min_gpus"]["tetris-greedy"]
    assert res["gpus"] is not None and 2 <= res["gpus"] <= 8
    assert res["prefill_instances"] + res["decode_instances"] == res["gpus"]


def test_whatif_bad_sweep_field(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown sweep field names the field."""
    err = run_bad(capsys, "whatif", "--trace", TRACE, "--sweep", "gpus=1,2")
    assert "gpus" in err


def test_whatif_on_ray_matches_local_processes(capsys: pytest.CaptureFixture[str]) -> None:
    """The same searches as Ray tasks (a private loopback cluster) give the same answers."""
    pytest.importorskip("ray")
    args = ["whatif", "--trace", TRACE, *CLUSTER, "--policy", "tetris-greedy", "--policy",
            "static-sp", "--max-evals", "5", "--rel-tol", "0.2"]
    local = run_json(capsys, *args, "--jobs", "2")
    on_ray = run_json(capsys, *args, "--ray-address", "local")
    for name in ("tetris-greedy", "static-sp"):
        assert on_ray["policies"][name]["search"] == local["policies"][name]["search"]


def test_simulate_tetris_milp_on_a_small_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The MILP planner drives a small simulation to completion with validated plans."""
    trace = "synthetic:n=6,rate=4,prompt=uniform(lo=1000;hi=6000),output=fixed(3),seed=2"
    out = run_json(capsys, "simulate", "--trace", trace, "--policy", "tetris-milp", *CLUSTER,
                   "--milp-time-limit-ms", "1000")
    assert out["metrics"]["finished"] == 6
    assert out["stats"]["plans_validated"] >= 6
