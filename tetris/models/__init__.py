"""Llama-family decoder with explicit positions and pluggable attention; weight loading."""
