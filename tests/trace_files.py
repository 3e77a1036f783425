"""Small trace files written for workload and trace-format tests, and the real traces' paths."""

from __future__ import annotations

from pathlib import Path

TRACES = Path("/work/shared/traces")
MOONCAKE = TRACES / "mooncake_conversation_trace.jsonl"
AZURE = TRACES / "AzureLLMInferenceTrace_conv.csv"
ARXIV = TRACES / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"

AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
LENGTH_HEADER = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"


def write_file(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def mooncake_line(ts: int, inp: int, out: int) -> str:
    return (f'{{"timestamp": {ts}, "input_length": {inp}, "output_length": {out}, '
            f'"hash_ids": [0, 1]}}\n')


def small_mooncake(tmp_path: Path) -> Path:
    # Two buckets: 0 ms (two requests), 3000 ms (one request); trailing blank lines allowed.
    return write_file(tmp_path, "m.jsonl", mooncake_line(0, 100, 10) + mooncake_line(0, 200, 20)
                      + mooncake_line(3000, 300, 30) + "\n\n")
