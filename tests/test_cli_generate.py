"""`tetris generate`: bad input exits 2 with one line naming it (no processes are started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tetris.cli.main import main


def run_bad(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["generate", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tetris: error:"), captured.err
    return lines[0]


def test_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown model name is named in the error."""
    assert "no-such-model" in run_bad(capsys, "--model", "no-such-model", "--prompt", "hi")


def test_missing_prompt_file(capsys: pytest.CaptureFixture[str], smollm2_dir: Path,
                             tmp_path: Path) -> None:
    """An unreadable prompt file names --prompt-file."""
    message = run_bad(capsys, "--model", str(smollm2_dir), "--prompt-file",
                      str(tmp_path / "nope.txt"))
    assert "--prompt-file" in message


def test_empty_prompt(capsys: pytest.CaptureFixture[str], smollm2_dir: Path) -> None:
    """A blank prompt is refused before anything runs."""
    assert "empty" in run_bad(capsys, "--model", str(smollm2_dir), "--prompt", "   ")


@pytest.mark.parametrize(("chunks", "needle"), [
    ("2:2,rest:1", "SP may only grow"),
    ("100000:1", "prompt has"),
    ("x", "TOKENS:SP"),
])
def test_bad_chunk_plans(capsys: pytest.CaptureFixture[str], smollm2_dir: Path, chunks: str,
                         needle: str) -> None:
    """Malformed or impossible chunk plans name --chunks and the problem."""
    message = run_bad(capsys, "--model", str(smollm2_dir), "--prompt", "Hello there, friend.",
                      "--chunks", chunks)
    assert "--chunks" in message and needle in message


def test_prompt_beyond_context(capsys: pytest.CaptureFixture[str], smollm2_dir: Path,
                               tmp_path: Path) -> None:
    """Prompt + max tokens beyond the model's context names the limit."""
    big = tmp_path / "big.txt"
    big.write_text("word " * 9000)
    message = run_bad(capsys, "--model", str(smollm2_dir), "--prompt-file", str(big),
                      "--max-tokens", "8")
    assert "context of 8192" in message


def test_bad_sampling_option(capsys: pytest.CaptureFixture[str], smollm2_dir: Path) -> None:
    """--top-p above 1 is refused."""
    assert "top_p" in run_bad(capsys, "--model", str(smollm2_dir), "--prompt", "hi",
                              "--top-p", "1.5")
