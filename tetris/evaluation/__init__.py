"""Simulator, baselines, workloads, metrics, plots (the Gantt chart lives here too)."""
