"""The scheduling core: problem data, cost model, planners and the independent plan validator.

Pure Python on purpose (no torch, no ray): the same objects drive the simulator and the runtime.
"""
