"""Accelerator specs the cost model is derived from.

Sources (vendor datasheets, dense math without sparsity):
- H100 SXM5 80GB: 989.4 TFLOP/s bf16, HBM3 3.35 TB/s, NVLink 4 900 GB/s bidirectional
  (450 GB/s each way), ConnectX-7 NDR 400 Gb/s per GPU (50 GB/s).
- H200 SXM 141GB: same compute as H100, HBM3e 4.8 TB/s, same links.
- A100 SXM4 80GB: 312 TFLOP/s bf16, HBM2e 2.039 TB/s, NVLink 3 600 GB/s bidirectional
  (300 GB/s each way), ConnectX-6 HDR 200 Gb/s per GPU (25 GB/s).
Topology as in a DGX H100 / DGX A100 node: 8 GPUs on NVLink, and one compute NIC per GPU
(`nics_per_node` 8: ConnectX-7 400 Gb/s on H100/H200, ConnectX-6 200 Gb/s on A100), so every
GPU sends across nodes at `inter_node_bandwidth` over its own NIC (full duplex). A GPU receiving
KV may take it in over all of its node's NICs and then NVLink (`multirail_receive`, as
Mooncake's Transfer Engine splits one transfer over several NICs), so eight prefill ranks sending
to one decode GPU are limited by their own NICs, not by one NIC at the receiver.
Link latencies are typical NCCL point-to-point figures (a few microseconds inside a node, tens
across nodes); `tetris profile` refits everything on the machine at hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class HardwareSpec(BaseModel):
    """One accelerator (or a TP group acting as one instance)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    peak_flops: float = Field(gt=0, description="dense bf16 FLOP/s")
    hbm_bytes: float = Field(gt=0, description="device memory")
    hbm_bandwidth: float = Field(gt=0, description="device memory bytes/s")
    intra_node_bandwidth: float = Field(gt=0, description="bytes/s one way, inside a node")
    inter_node_bandwidth: float = Field(gt=0, description="bytes/s one way, across nodes")
    intra_node_latency_s: float = Field(default=5e-6, ge=0)
    inter_node_latency_s: float = Field(default=20e-6, ge=0)
    nics_per_node: int | None = Field(default=None, gt=0, description="compute NICs per "
                                      "node, each at inter_node_bandwidth; None: one per GPU. "
                                      "With fewer NICs than GPUs, neighbouring GPUs share one")
    multirail_receive: bool = Field(default=True, description="a transfer into a GPU may "
                                    "arrive over every NIC of its node and reach the GPU over "
                                    "NVLink (as Mooncake's Transfer Engine aggregates NICs); "
                                    "False: only over the GPU's own NIC")


GB = 1e9
HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    "h100": HardwareSpec(
        name="h100",
        peak_flops=989.4e12,
        hbm_bytes=80 * GB,
        hbm_bandwidth=3.35e12,
        intra_node_bandwidth=450 * GB,
        inter_node_bandwidth=50 * GB,
    ),
    "h200": HardwareSpec(
        name="h200",
        peak_flops=989.4e12,
        hbm_bytes=141 * GB,
        hbm_bandwidth=4.8e12,
        intra_node_bandwidth=450 * GB,
        inter_node_bandwidth=50 * GB,
    ),
    "a100": HardwareSpec(
        name="a100",
        peak_flops=312e12,
        hbm_bytes=80 * GB,
        hbm_bandwidth=2.039e12,
        intra_node_bandwidth=300 * GB,
        inter_node_bandwidth=25 * GB,
    ),
}


def load_hardware(name_or_path: str) -> HardwareSpec:
    """A preset by name, or a HardwareSpec JSON file. Raises ValueError naming what is wrong."""
    key = name_or_path.lower()
    if key in HARDWARE_PRESETS:
        return HARDWARE_PRESETS[key]
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return HardwareSpec.model_validate(json.loads(path.read_text()))
    raise ValueError(
        f"unknown hardware {name_or_path!r}: use one of {', '.join(sorted(HARDWARE_PRESETS))} "
        "or a .json file"
    )
