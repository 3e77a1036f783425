"""Run by tests/test_two_node.py in a process of its own: a two-node Ray cluster on loopback
(`ray.cluster_utils.Cluster`: a head and a second node, each its own raylet), `tetris serve
--ray-address` on it with the actors spread over both nodes, one greedy completion over HTTP.
Prints one JSON line: the actors' nodes, the planner's nodes, the answer's tokens and HF's."""

from __future__ import annotations

import json
import os
import sys
import urllib.request

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read by Ray at import: loopback

from ray.cluster_utils import Cluster

from tests.live import hf_greedy, hf_model, live_daemon
from tetris.runtime.ports import free_port
from tetris.runtime.serve_config import SERVE_POLICY, ServeConfig

TEXT = ("Lighthouses stand on rocky coasts and guide ships at night with a turning beam of "
        "light. ")


def main() -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        config = ServeConfig(port=free_port(), ray_address=cluster.address, placement="spread",
                             prefill_instances=2, decode_instances=1,
                             kv_tokens_per_instance=4096,
                             policy=SERVE_POLICY.model_copy(update={"max_sp": 2}))
        with live_daemon(config) as (url, deployment):
            prompt = deployment.engine.encode(TEXT * 30)[:600]
            body = json.dumps({"model": "smollm2", "prompt": prompt, "max_tokens": 8,
                               "temperature": 0}).encode()
            request = urllib.request.Request(url + "/v1/completions", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as reply:
                answer = json.load(reply)
            cluster_spec = deployment.engine.cost_model.cluster
            reference = hf_greedy(hf_model(deployment.model_dir),
                                  deployment.engine.tokenizer.eos_ids, prompt, 8)
            print(json.dumps({
                "actor_nodes": list(deployment.pool.nodes),
                "planner_nodes": [cluster_spec.node_of(i)
                                  for i in range(cluster_spec.total_gpus)],
                "ray_nodes": len(deployment.ray.nodes()),
                "chunks": answer["tetris"]["chunks"],
                "token_ids": answer["tetris"]["token_ids"], "hf": reference}))
    finally:
        import ray

        ray.shutdown()  # the driver first: Ray refuses to remove the node it is connected to
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
