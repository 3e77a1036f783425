"""The files options name — `--config`, `--hardware`, `--model`, `--calibration` — read with
errors that name the option, the file and its line or field, as one UsageError."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tetris.cli.errors import UsageError, for_option, one_line
from tetris.solver.calibration import Calibration
from tetris.solver.hardware import HARDWARE_PRESETS, HardwareSpec, load_hardware
from tetris.solver.input_files import read_json_object
from tetris.solver.model_spec import ModelSpec, load_model_spec
from tetris.solver.policy.settings import PolicySettings

M = TypeVar("M", bound=BaseModel)
#: Longest solver budget accepted (one day): far past it, deadlines overflow the platform's
#: time_t inside the solvers' threads.
MAX_TIME_LIMIT_MS = 86_400_000.0
#: Largest price of a missed SLO, in seconds of TTFT: keeps the objective's sums finite.
MAX_MISS_PENALTY = 1e9


def config_file(path: Path, option: str = "--config") -> dict[str, Any]:
    """The JSON object of a config file; UsageError "--config PATH:LINE: what is wrong"."""
    return for_option(option, read_json_object, path)


def validated(option: str, path: Path | None, model: type[M], data: object) -> M:
    """`model` validated from `data`; the error names `option` and, when the settings came
    from a file, the file (a field of a JSON object has no line to name)."""
    try:
        return model.model_validate(data)
    except (ValidationError, ValueError) as err:
        where = f"{option} {path}" if path is not None else option
        raise UsageError(f"{where}: {one_line(err)}") from None


def hardware_option(value: str, option: str = "--hardware") -> HardwareSpec:
    """A hardware preset or HardwareSpec JSON file."""
    if value.lower() not in HARDWARE_PRESETS and Path(value).suffix == ".json" \
            and Path(value).is_file():
        # Read here so that a broken file is named with its line; load_hardware says only
        # what json.loads says.
        return validated(option, Path(value), HardwareSpec, config_file(Path(value), option))
    return for_option(option, load_hardware, value)


def model_option(value: str, option: str = "--model") -> ModelSpec:
    """A model preset, an HF config.json or a checkpoint directory (errors name the file)."""
    return for_option(option, load_model_spec, value)


def calibration_option(value: str | None, option: str = "--calibration") -> Calibration | None:
    """A calibration JSON written by `tetris profile` (None stays None)."""
    return None if value is None else for_option(option, Calibration.load, value)


def check_limits(policy: PolicySettings, where: str) -> None:
    """UsageError for policy settings that pydantic's bounds let through but no run survives."""
    for name, high in (("time_limit_ms", MAX_TIME_LIMIT_MS),
                       ("milp_time_limit_ms", MAX_TIME_LIMIT_MS),
                       ("miss_penalty", MAX_MISS_PENALTY)):
        value = getattr(policy, name)
        if value > high:
            raise UsageError(f"{where}: policy.{name} must be <= {high:g}, got {value:g}")
