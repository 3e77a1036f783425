"""`tetris serve` driven by an external load generator, GuideLLM (vLLM project's benchmark
client; nothing in this repo wrote it), and its numbers set against the daemon's own.

Starts `tetris serve` (embedded SmolLM2, 127.0.0.1, a free port) as a subprocess, sends one
warm-up chat, then per concurrency level runs `guidellm run` (synthetic prompts of
`--prompt-tokens`, `--output-tokens` out, `--requests` requests, streamed chat completions) and
scrapes /metrics before and after it. Prints one JSON, also written to `--out`: GuideLLM's TTFT
and inter-token latency (mean, p50, p90) beside the daemon's histograms
(tetris:time_to_first_token_seconds, tetris:inter_token_latency_seconds: mean from _sum/_count,
quantiles interpolated within buckets as Prometheus' histogram_quantile does) and the request
counts each side saw. The daemon is stopped by its pid at the end and on error.

GuideLLM pulls torch, datasets and a newer transformers, so it lives in its own venv
(`--client-venv`, made on first use with torch pinned to this venv's CPU build):

    .venv/bin/python benchmarks/load_generator.py --streams 1,4 --requests 12
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tetris.models.fetch import fetch_model
from tetris.runtime.ports import free_port

GUIDELLM = "guidellm==0.8.1"
RESULTS = Path(__file__).parent / "results" / "load_generator.json"
HISTOGRAMS = {"ttft_s": "tetris:time_to_first_token_seconds",
              "itl_s": "tetris:inter_token_latency_seconds"}
NOTES = {
    "daemon_quantiles": "interpolated within tetris' latency buckets (1-2.5-5 steps), so "
                        "p50/p90 are bucket-resolution estimates; means are exact",
    "itl_quantiles": "GuideLLM's ITL percentiles are over each request's mean inter-token "
                     "time (weighted by its tokens), the daemon's over every single gap, so "
                     "only the means measure the same thing",
    "http_responses": "the daemon counts every route: GuideLLM's /health and /v1/models "
                      "checks and the /metrics scrapes are among the 200s",
    "exit_code": "15 after SIGTERM is the clean path: uvicorn stops the engine and actors, "
                 "then re-raises the signal into Ray's driver handler, sys.exit(SIGTERM)",
}
COUNTERS = ("tetris:request_success_total", "tetris:http_responses_total",
            "tetris:request_rejected_total")


def ensure_client(venv: Path) -> Path:
    """The guidellm executable, installing it into `venv` first if needed."""
    exe = venv / "bin" / "guidellm"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pin:
        # An unpinned torch resolves to a CUDA build of several GB; this one is on disk.
        pin.write(f"torch=={version('torch')}\n")
    try:
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", pin.name, GUIDELLM],
                       check=True)
    finally:
        os.unlink(pin.name)
    return exe


def get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return str(reply.read().decode())


def start_daemon(port: int, log: Path) -> subprocess.Popen[bytes]:
    tetris = Path(sys.executable).parent / "tetris"
    argv = [str(tetris), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]
    with log.open("wb") as sink:
        return subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)


def wait_healthy(url: str, daemon: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"tetris serve exited with {daemon.returncode}")
        try:
            if json.loads(get(f"{url}/health", 2)).get("status") == "ok":
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"tetris serve not healthy within {timeout_s:.0f} s")


def stop_daemon(daemon: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM (uvicorn's clean stop: engine, actors, private Ray), SIGKILL if it hangs."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=30)
    return daemon.returncode


def warm_up(url: str, model: str) -> None:
    """One request before the first scrape: the first forward pass of each actor is slow
    (allocation, lazy init) and would weigh on both sides' numbers alike."""
    body = json.dumps({"model": model, "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "Say hello."}]}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as reply:
        reply.read()


Scrape = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(url: str) -> Scrape:
    """Every sample of /metrics: sample name -> labels -> value."""
    samples: Scrape = {}
    for family in text_string_to_metric_families(get(f"{url}/metrics")):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = float(sample.value)
    return samples


def delta(before: Scrape, after: Scrape, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    old = before.get(name, {})
    return {labels: value - old.get(labels, 0.0) for labels, value in after.get(name, {}).items()}


def bucket_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: linear within the bucket holding rank q * count;
    `buckets` are (upper bound, cumulative count), +Inf last."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # rank beyond the last finite bound: its value
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count)
        lower_bound, lower_count = bound, count
    return None


def histogram_stats(before: Scrape, after: Scrape, name: str) -> dict[str, Any]:
    total = sum(delta(before, after, f"{name}_count").values())
    summed = sum(delta(before, after, f"{name}_sum").values())
    cumulative = sorted((float(dict(labels)["le"]), count)
                        for labels, count in delta(before, after, f"{name}_bucket").items())
    return {"count": total, "mean": summed / total if total else None,
            "p50": bucket_quantile(0.5, cumulative), "p90": bucket_quantile(0.9, cumulative)}


def counters(before: Scrape, after: Scrape) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name in COUNTERS:
        for labels, value in delta(before, after, name).items():
            if value:
                key = ",".join(f"{k}={v}" for k, v in labels) or "all"
                out.setdefault(name, {})[key] = value
    return out


def client_command(exe: Path, url: str, model: str, tokenizer: Path, streams: int,
                   args: argparse.Namespace, out: Path) -> list[str]:
    def cfg(**kwargs: Any) -> str:
        return json.dumps(kwargs, separators=(",", ":"))

    # The daemon speaks HTTP/1.1; GuideLLM defaults to negotiating HTTP/2.
    return [str(exe), "run",
            "--backend", cfg(kind="openai_http", target=url, model=model, http2=False,
                             timeout=600),
            "--tokenizer", cfg(kind="huggingface_auto", model=str(tokenizer)),
            "--data", cfg(kind="synthetic_text", prompt_tokens=args.prompt_tokens,
                          output_tokens=args.output_tokens),
            "--profile", cfg(kind="concurrent", streams=[streams]),
            "--constraint", cfg(kind="max_requests", count=args.requests),
            "--seed", cfg(kind="static", value=args.seed),
            "--output", cfg(kind="json", path=str(out)),
            "--disable-console-interactive"]


def client_stats(report: dict[str, Any]) -> dict[str, Any]:
    bench = report["benchmarks"][0]
    metrics = bench["metrics"]

    def seconds(key: str) -> dict[str, Any]:
        stat = metrics[key]["successful"]
        return {"count": stat["count"], "mean": stat["mean"] / 1000,
                "p50": stat["percentiles"]["p50"] / 1000,
                "p90": stat["percentiles"]["p90"] / 1000}

    requests = bench["requests"]["successful"]
    return {"ttft_s": seconds("time_to_first_token_ms"),
            "itl_s": seconds("inter_token_latency_ms"),
            "requests": metrics["request_totals"],
            "prompt_tokens_mean": sum(r["prompt_tokens"] for r in requests) / len(requests),
            "output_tokens_mean": sum(r["output_tokens"] for r in requests) / len(requests),
            "duration_s": bench["duration"]}


def run_level(exe: Path, url: str, model: str, tokenizer: Path, streams: int,
              args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / f"guidellm_c{streams}.json"
    argv = client_command(exe, url, model, tokenizer, streams, args, out)
    before = scrape(url)
    started = time.monotonic()
    with (workdir / f"guidellm_c{streams}.log").open("wb") as log:
        done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                              env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=args.level_timeout)
    wall = time.monotonic() - started
    after = scrape(url)
    if done.returncode != 0:
        tail = (workdir / f"guidellm_c{streams}.log").read_text()[-3000:]
        raise RuntimeError(f"guidellm exited with {done.returncode}:\n{tail}")
    client = client_stats(json.loads(out.read_text()))
    daemon: dict[str, Any] = {key: histogram_stats(before, after, name)
                              for key, name in HISTOGRAMS.items()}
    daemon["counters"] = counters(before, after)
    daemon["requests_finished"] = sum(delta(before, after,
                                            "tetris:request_success_total").values())
    gaps = {key: {stat: (client[key][stat] - daemon[key][stat]
                         if daemon[key][stat] is not None else None)
                  for stat in ("mean", "p50", "p90")} for key in HISTOGRAMS}
    return {"streams": streams, "wall_s": wall, "client_command": shlex.join(argv),
            "client": client, "daemon": daemon, "client_minus_daemon_s": gaps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,4", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=12, help="requests per level")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--client-venv", type=Path,
                        default=Path(tempfile.gettempdir()) / "tetris-bench" / "guidellm-venv")
    parser.add_argument("--serve-timeout", type=float, default=300.0)
    parser.add_argument("--level-timeout", type=float, default=240.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    exe = ensure_client(args.client_venv)
    client_version = subprocess.run([str(exe), "--version"], capture_output=True,
                                    text=True).stdout.strip()
    tokenizer = fetch_model("smollm2")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="tetris-load-"))
    started = time.monotonic()
    daemon = start_daemon(port, workdir / "serve.log")
    levels: list[dict[str, Any]] = []
    try:
        wait_healthy(url, daemon, args.serve_timeout)
        model = json.loads(get(f"{url}/v1/models"))["data"][0]["id"]
        warm_up(url, model)
        for streams in (int(s) for s in args.streams.split(",")):
            levels.append(run_level(exe, url, model, tokenizer, streams, args, workdir))
    except BaseException:
        print((workdir / "serve.log").read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        code = stop_daemon(daemon)
    result = {
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "client": {"name": "guidellm", "package": GUIDELLM, "version": client_version,
                   "venv": str(args.client_venv)},
        "daemon": {"command": f"tetris serve --host 127.0.0.1 --port {port}",
                   "model": "smollm2 (embedded SmolLM2-135M-Instruct)",
                   "exit_code": code},
        "workload": {"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                     "requests_per_level": args.requests, "seed": args.seed,
                     "note": "synthetic prompts counted by GuideLLM with the model's tokenizer; "
                             "the chat template adds the difference seen in "
                             "prompt_tokens_mean. GuideLLM sends ignore_eos, which the "
                             "daemon ignores, so a reply may end before output_tokens"},
        "host": {"cpus": os.cpu_count()},
        "notes": NOTES,
        "levels": levels,
        "total_wall_s": time.monotonic() - started,
    }
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
