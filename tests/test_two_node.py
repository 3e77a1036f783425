"""`tetris serve --ray-address` on a two-node Ray cluster on loopback: the actors run on both
nodes, the planner's cluster has each instance on its actor's node, and a greedy completion
served across them equals HF's tokens. In a process of its own (its own Ray cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_the_daemon_serves_from_actors_on_two_nodes(smollm2_dir: Path) -> None:
    """3 actors spread over 2 nodes: both nodes hold actors, the planner's node map is the
    actors', the answer is HF's greedy tokens."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.two_node_daemon"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ray_nodes"] == 2
    assert sorted(set(report["actor_nodes"])) == [0, 1]
    assert report["planner_nodes"] == report["actor_nodes"]
    assert report["token_ids"] == report["hf"]
