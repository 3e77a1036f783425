"""Tetris: long-context LLM serving with Chunkwise Dynamic Sequence Parallelism (CDSP)."""

__version__ = "0.1.0"
