"""`tetris plan` end to end, in-process: JSON plans per solver, table, Gantt, and bad input."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tetris import __version__
from tetris.cli.main import main
from tetris.solver.plan import SolveResult, SolveStatus
from tetris.solver.plan_json import PlanReport

BASE = ["plan", "--model", "llama3-8b", "--hardware", "h100", "--prefill-instances", "8"]
MIXED = ["--availability", "0,0,3,3,1,1,0,2", "--request", "131072", "--request", "32768",
         "--request", "8192@0.5", "--request", "2048@1.0"]


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> PlanReport:
    rc = main([*BASE, *args, "--format", "json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert err == ""
    return PlanReport.model_validate_json(out)  # the whole of stdout is one report


def run_bad(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tetris: error: ")
    return lines[0]


def check_plans(report: PlanReport) -> None:
    """Each plan covers its prompt in order on nested groups, never before availability."""
    for plan in report.plans:
        assert plan.chunks[0].start_token == 0 and plan.chunks[-1].end_token == plan.prompt_tokens
        for a, b in zip(plan.chunks, plan.chunks[1:], strict=False):
            assert a.end_token == b.start_token and b.start_s >= a.end_s - 1e-9
            assert set(a.instances) <= set(b.instances)
        for c in plan.chunks:
            assert c.start_s >= max(plan.arrival_s, 0.0) - 1e-9
            assert all(c.start_s >= report.availability_s[g] - 1e-9 for g in c.instances)


def test_long_prompt_starts_now_and_expands(capsys: pytest.CaptureFixture[str]) -> None:
    """CP starts a 128k prompt on the 3 free instances now and grows SP, beating one SP size."""
    args = ["--availability", "0,0,0,3,3,3,3,3", "--request", "131072", "--solver", "cp"]
    report = run_json(capsys, *args)
    assert report.solver.name == "cp" and report.solver.status in ("optimal", "feasible")
    assert report.availability_s == [0, 0, 0, 3, 3, 3, 3, 3]
    (plan,) = report.plans
    check_plans(report)
    assert plan.request_id == "r0" and plan.prompt_tokens == 131072
    assert len(plan.chunks) >= 2
    sps = [c.sp for c in plan.chunks]
    assert sps == sorted(sps) and sps[-1] > sps[0]
    assert plan.chunks[0].start_s == 0.0 and set(plan.chunks[0].instances) == {0, 1, 2}
    assert plan.ttft_s == pytest.approx(plan.prefill_end_s)
    assert plan.slo_slack_s == pytest.approx(plan.ttft_slo_s - plan.ttft_s)

    (single,) = run_json(capsys, *args, "--max-chunks", "1").plans
    assert len(single.chunks) == 1
    assert plan.prefill_end_s < single.prefill_end_s


@pytest.mark.parametrize("solver", ["greedy", "cp", "milp"])
def test_every_solver_plans_mixed_requests(
    capsys: pytest.CaptureFixture[str], solver: str
) -> None:
    """Each solver plans all four mixed-length requests on mixed availability, in seconds."""
    started = time.perf_counter()
    report = run_json(capsys, *MIXED, "--solver", solver, "--time-limit-ms", "20000")
    elapsed = time.perf_counter() - started
    assert report.solver.name == solver
    assert [p.request_id for p in report.plans] == ["r0", "r1", "r2", "r3"]
    assert [p.prompt_tokens for p in report.plans] == [131072, 32768, 8192, 2048]
    assert [p.arrival_s for p in report.plans] == [0.0, 0.0, 0.5, 1.0]
    check_plans(report)
    assert elapsed < 25.0  # measured: milp (CBC) ≈ 0.5 s here


def test_table_output_and_gantt(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """The table lists the solver line, every chunk and request, and --gantt writes the chart."""
    gantt = tmp_path / "plan.png"
    rc = main([*BASE, *MIXED, "--solver", "greedy", "--gantt", str(gantt)])
    out, err = capsys.readouterr()
    assert rc == 0 and err == ""
    assert out.startswith("solver greedy: feasible")
    for needle in ("Chunks", "Requests", "-131072", "instances", "slack s", "r3"):
        assert needle in out
    assert gantt.stat().st_size > 10_000


def test_requests_file_with_ids_and_slos(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A JSONL file gives ids, arrivals and per-line SLOs; other requests get the scaled SLO."""
    path = tmp_path / "reqs.jsonl"
    path.write_text('{"prompt_tokens": 4096, "request_id": "doc", "ttft_slo_s": 2.5}\n\n'
                    '{"prompt_tokens": 1024, "arrival_s": 0.25}\n')
    report = run_json(capsys, "--requests", str(path), "--ttft-slo-scale", "3", "--solver",
                      "greedy")
    doc, other = report.plans
    assert (doc.request_id, doc.ttft_slo_s) == ("doc", 2.5)
    assert other.request_id == "r1" and other.arrival_s == 0.25
    assert 0 < other.ttft_slo_s < 2.5


def test_absolute_slo_applies_to_all(capsys: pytest.CaptureFixture[str]) -> None:
    """--ttft-slo sets the same absolute SLO on every request."""
    report = run_json(capsys, "--request", "1024", "--request", "2048", "--ttft-slo", "1.5",
                      "--solver", "greedy")
    assert [p.ttft_slo_s for p in report.plans] == [1.5, 1.5]


def test_no_plan_exits_one(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    """A solver status without plans is printed and the exit status is 1."""
    import tetris.solver.api as api

    def no_plan(*_: object, **__: object) -> SolveResult:
        return SolveResult("cp", SolveStatus.NO_SOLUTION, None, None, 5.0)

    monkeypatch.setattr(api, "solve", no_plan)
    rc = main([*BASE, "--request", "1024", "--format", "json"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert json.loads(out)["solver"]["status"] == "no_solution"
    assert "no_solution" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`tetris --version` prints the package version and exits 0."""
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"tetris {__version__}"


def test_bad_availability_length(capsys: pytest.CaptureFixture[str]) -> None:
    """An availability list of the wrong length names --availability."""
    line = run_bad(capsys, *BASE, "--availability", "0,0,3", "--request", "1024")
    assert "--availability" in line and "3 entries" in line


def test_bad_availability_value(capsys: pytest.CaptureFixture[str]) -> None:
    """A negative or non-numeric availability entry names --availability."""
    for value in ("0,0,0,-1,0,0,0,0", "0,0,0,soon,0,0,0,0"):
        assert "--availability" in run_bad(capsys, *BASE, "--availability", value,
                                           "--request", "1024")


def test_negative_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    """A negative prompt length names the request."""
    line = run_bad(capsys, *BASE, "--request", "1024", "--request", "-5")
    assert "--request r1" in line and "-5" in line


def test_tokens_above_context(capsys: pytest.CaptureFixture[str]) -> None:
    """A prompt longer than the model's max context names the request and the limit."""
    line = run_bad(capsys, *BASE, "--request", "131073")
    assert "--request r0" in line and "131072" in line


def test_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown model name names --model and lists the presets."""
    line = run_bad(capsys, "plan", "--model", "gpt-17", "--request", "1024")
    assert "--model" in line and "llama3-8b" in line


def test_unknown_hardware(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown hardware name names --hardware."""
    line = run_bad(capsys, "plan", "--hardware", "tpu-v9", "--request", "1024")
    assert "--hardware" in line and "h100" in line


def test_malformed_jsonl_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Bad JSONL lines are reported as FILE:LINE: bad JSON, bad values and unknown keys alike."""
    path = tmp_path / "reqs.jsonl"
    for bad in ('{"prompt_tokens": 12,', '{"prompt_tokens": 0}', '{"prompt_tokens": 8, "x": 1}'):
        path.write_text('{"prompt_tokens": 1024}\n\n' + bad + "\n")
        assert f"{path}:3: " in run_bad(capsys, *BASE, "--requests", str(path))


def test_time_limit_not_positive(capsys: pytest.CaptureFixture[str]) -> None:
    """A time limit of zero or below names --time-limit-ms."""
    for value in ("0", "-10"):
        line = run_bad(capsys, *BASE, "--request", "1024", "--time-limit-ms", value)
        assert "--time-limit-ms" in line and "> 0" in line


def test_other_bad_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Bad --max-sp, --gantt suffix, --request syntax and unknown options are one line too."""
    cases = {
        "--max-sp": ["--request", "1024", "--max-sp", "9"],
        "--gantt": ["--request", "1024", "--gantt", str(tmp_path / "plan.pdf")],
        "--request": ["--request", "1k@soon"],
        "unrecognized": ["--request", "1024", "--frobnicate"],
    }
    for needle, args in cases.items():
        assert needle in run_bad(capsys, *BASE, *args)
    assert not list(tmp_path.iterdir())


def test_requests_file_unnamed_ids_skip_taken_ones(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Line 1 names itself r1; unnamed line 2 would be r1 too, so it becomes r2. A byte-order
    mark and a U+2028 inside a string are fine (only "\\n" ends a JSONL line)."""
    path = tmp_path / "reqs.jsonl"
    path.write_text('\ufeff{"request_id": "r1", "prompt_tokens": 1024}\n'
                    '{"prompt_tokens": 2048}\n'
                    '{"request_id": "odd\u2028id", "prompt_tokens": 512}\n', encoding="utf-8")
    assert main(["plan", "--requests", str(path), "--solver", "greedy", "--format", "json"]) == 0
    ids = [p["request_id"] for p in json.loads(capsys.readouterr().out)["plans"]]
    assert ids == ["r1", "r2", "odd\u2028id"]


# -- --from-server -----------------------------------------------------------------------------
SERVED_PLAN: dict[str, Any] = {
    "solver": {"name": "cp", "status": "feasible", "wall_ms": 4.0, "objective": 2.5,
               "bound": 2.0, "stats": {}},
    "availability_s": [0.0, 0.0, 1.5, 1.5],
    "plans": [
        {"request_id": "cmpl-a", "arrival_s": 0.0, "prompt_tokens": 65536, "prefill_end_s": 2.5,
         "ttft_s": 2.5, "ttft_slo_s": 4.0, "slo_slack_s": 1.5,
         "chunks": [{"start_token": 0, "end_token": 32768, "instances": [0, 1],
                     "start_s": 0.0, "end_s": 1.5},
                    {"start_token": 32768, "end_token": 65536, "instances": [0, 1, 2, 3],
                     "start_s": 1.5, "end_s": 2.5}]},
        {"request_id": "cmpl-b", "arrival_s": -0.5, "prompt_tokens": 4096, "prefill_end_s": 3.0,
         "ttft_s": 3.5, "ttft_slo_s": 2.0, "slo_slack_s": -1.5,
         "chunks": [{"start_token": 0, "end_token": 4096, "instances": [2, 3],
                     "start_s": 2.5, "end_s": 3.0}]},
    ],
    "engine_extra": {"ignored": True},  # readers must ignore fields they do not know
}


@pytest.fixture
def plan_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A tiny HTTP server on 127.0.0.1: /good serves SERVED_PLAN, /bad a non-plan, else 404."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            bodies = {"/good/v1/tetris/plan": SERVED_PLAN, "/bad/v1/tetris/plan": {"plans": []}}
            if self.path not in bodies:
                self.send_error(404)
                return
            body = json.dumps(bodies[self.path]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:  # keep test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_from_server_table_json_and_gantt(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, plan_server: str
) -> None:
    """--from-server prints the live plan like a local one (table, JSON) and draws its Gantt."""
    gantt = tmp_path / "live.png"
    assert main(["plan", "--from-server", f"{plan_server}/good", "--gantt", str(gantt)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("solver cp: feasible, 4.0 ms, objective 2.5000, bound 2.0000")
    assert f"live plan of {plan_server}/good; availability (s): 0 0 1.5 1.5" in out
    for needle in ("Chunks", "Requests", "cmpl-a", "0-32768", "32768-65536", "0-3", "MISSED",
                   f"Gantt chart written to {gantt}"):
        assert needle in out
    assert gantt.stat().st_size > 10_000

    # An OpenAI base URL (".../v1") works too; JSON is the served plan, extras kept.
    assert main(["plan", "--from-server", f"{plan_server}/good/v1/", "--format", "json"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out) == SERVED_PLAN


def test_from_server_errors(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, plan_server: str
) -> None:
    """Unreachable servers, HTTP errors, non-plans and non-URLs are one line and exit 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # nothing listens there once the socket is closed
    cases = {
        f"http://127.0.0.1:{closed_port}": "cannot reach",
        f"{plan_server}/missing": "HTTP 404",
        f"{plan_server}/bad": "did not return a plan",
        "127.0.0.1:8000": "expected an http:// or https:// URL",
    }
    for url, needle in cases.items():
        line = run_bad(capsys, "plan", "--from-server", url, "--gantt", str(tmp_path / "x.svg"))
        assert "--from-server" in line and needle in line, line
    assert "not allowed with" in run_bad(capsys, "plan", "--from-server", plan_server,
                                         "--request", "1024")
    assert not list(tmp_path.iterdir())
