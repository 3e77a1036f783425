"""Workload spec strings: one string names a trace file or a synthetic workload.

`load_workload(spec)` turns one string into a workload. The grammar:

    spec        := "mooncake:" PATH          Mooncake FAST'25 JSONL (arrivals in ms)
                 | "azure:" PATH             Azure LLM inference CSV (TIMESTAMP,ContextTokens,...)
                 | "synthetic:" KV ("," KV)*
                 | PATH                      .jsonl -> mooncake; .csv with the Azure header -> azure
                 | NAME                      a public trace fetched by `tetris trace fetch NAME`
                                             (trace_catalog.CATALOG; also as a PATH below)
    KV          := KEY "=" VALUE
        n=INT                   number of requests (required)
        rate=FLOAT              arrival rate in req/s (required)
        arrival=poisson|gamma|constant   (default poisson)
        cv=FLOAT                gamma only: coefficient of variation of the gaps (default 1)
        prompt=LENGTH           prompt-length distribution      } both, or `paired`
        output=LENGTH           output-length distribution      }
        paired=SOURCE           sample (prompt, output) rows jointly from a file (keeps correlation)
        seed=INT                default: the `seed` argument of load_workload
    LENGTH      := "fixed(" INT ")"
                 | "uniform(lo=INT;hi=INT)"                       integers in [lo, hi]
                 | "zipf(a=FLOAT[;min=INT];max=INT)"              P(k) ∝ k^-a on [min, max]
                 | "lognormal(median=FLOAT;sigma=FLOAT[;min=INT][;max=INT])"
                                              rounded, truncated to [min, max] (default min 1)
                 | "empirical(" PATH [";column=NAME"] ")"         resampled column of a file
                                              (default: the prompt or output column by role)
    SOURCE      := PATH | "empirical(" PATH [";prompt_column=NAME"][";output_column=NAME"] ")"

Inside parentheses, arguments are separated by ";" or ","; the top-level split on "," ignores
commas inside parentheses. A PATH inside a synthetic spec may therefore contain neither
parentheses nor ";"/",". An empirical PATH may be a length CSV (vidur; default columns
num_prefill_tokens / num_decode_tokens), an Azure CSV (ContextTokens / GeneratedTokens) or a
Mooncake JSONL (input_length / output_length). Every parse error is a `WorkloadSpecError` that
quotes the offending part.

Arrival times start at 0; the realised mean rate of a synthetic workload differs from `rate` by
sampling noise (`Workload.scaled_to_rate` makes it exact). Names (kinds, keys, distributions,
arrival processes) are case-insensitive; paths and column names are not.

Example: "synthetic:n=1000,rate=2,arrival=gamma,cv=2,prompt=lognormal(median=8000;sigma=1;
min=128;max=131072),output=uniform(lo=100;hi=500),seed=3".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from tetris.evaluation.synthetic import (
    ARRIVALS,
    Empirical,
    Fixed,
    LengthDistribution,
    LogNormal,
    Uniform,
    Zipf,
    synthetic_workload,
)
from tetris.evaluation.trace_catalog import PublicTrace, fetched_path, local_path, public_trace
from tetris.evaluation.trace_formats import (
    TraceFormatError,
    load_azure,
    load_column,
    load_lengths,
    load_mooncake,
)
from tetris.evaluation.workload import IntArray, LengthSamples, Workload
from tetris.solver.input_files import cut, decode_text, shown

_T = TypeVar("_T")


class WorkloadSpecError(ValueError):
    """A workload spec string that does not parse; the message quotes the offending part."""


def _q(text: str) -> str:
    # Specs are quoted in errors; a 5000-digit value must not make the message 5000 wide.
    return repr(cut(text, 160))


_SYNTHETIC_KEYS = ("n", "rate", "arrival", "cv", "prompt", "output", "paired", "seed")


def load_workload(spec: str, *, seed: int = 0, spread_buckets: bool = True) -> Workload:
    """Load a trace or generate a synthetic workload from a spec string (grammar: module doc).

    `seed` drives Mooncake bucket spreading and synthetic sampling (a `seed=` key in a
    synthetic spec wins); `spread_buckets` applies to Mooncake traces only.
    """
    if seed < 0:
        raise WorkloadSpecError(f"workload spec seed must be >= 0, got {seed}")
    kind, sep, rest = spec.partition(":")
    kind = kind.lower()
    if sep and kind == "mooncake":
        return load_mooncake(_existing(rest, spec), spread_buckets=spread_buckets, seed=seed)
    if sep and kind == "azure":
        return load_azure(_existing(rest, spec))
    if sep and kind == "synthetic":
        return _synthetic_from_spec(rest, spec, seed)
    path = Path(spec)
    trace = public_trace(spec)
    if trace is not None and not path.exists():
        return _load_public(trace, spec, seed=seed, spread_buckets=spread_buckets)
    if not path.exists():
        if sep and "/" not in kind and "\\" not in kind:
            raise WorkloadSpecError(f"workload spec {_q(spec)}: unknown kind {_q(kind)} (use "
                                    "mooncake:PATH, azure:PATH, synthetic:KEY=VAL,... or a path)")
        raise FileNotFoundError(f"workload spec {_q(spec)}: no such file")
    return _load_by_content(path, spec, seed=seed, spread_buckets=spread_buckets)


def _load_public(trace: PublicTrace, spec: str, *, seed: int, spread_buckets: bool) -> Workload:
    path = fetched_path(trace.name)
    if trace.kind == "mooncake":
        return load_mooncake(path, spread_buckets=spread_buckets, seed=seed)
    if trace.kind == "azure":
        return load_azure(path)
    raise WorkloadSpecError(f"workload spec {_q(spec)}: {trace.name} has lengths only, no "
                            f"arrivals: synthetic:n=...,rate=...,paired={trace.name}")


def _existing(text: str, spec: str) -> Path:
    if not text:
        raise WorkloadSpecError(f"workload spec {_q(spec)}: missing PATH after the colon")
    path = Path(text)
    if path.is_dir():
        raise WorkloadSpecError(f"workload spec {_q(spec)}: {_q(text)} is a directory, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"workload spec {_q(spec)}: no such file {_q(text)}")
    return path


def _is_azure_csv(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            first = handle.readline(1 << 16)
    except OSError as err:
        raise TraceFormatError(path, None, f"cannot read: {err.strerror}") from None
    header = decode_text(first, path, TraceFormatError, "utf-8-sig").strip()
    return [c.strip() for c in header.split(",")][:3] == ["TIMESTAMP", "ContextTokens",
                                                          "GeneratedTokens"]


def _load_by_content(path: Path, spec: str, *, seed: int, spread_buckets: bool) -> Workload:

    if path.suffix == ".jsonl":
        return load_mooncake(path, spread_buckets=spread_buckets, seed=seed)
    if path.suffix == ".csv":
        if _is_azure_csv(path):
            return load_azure(path)
        raise WorkloadSpecError(
            f"workload spec {_q(spec)}: this CSV has no Azure header (TIMESTAMP,ContextTokens,"
            f"GeneratedTokens); a lengths-only file needs arrivals: "
            f"synthetic:n=...,rate=...,paired={spec}")
    raise WorkloadSpecError(f"workload spec {_q(spec)}: cannot tell the format from the suffix "
                            f"{path.suffix!r}; write mooncake:PATH or azure:PATH")


def _load_samples(path_text: str, part: str, prompt_column: str | None = None,
                  output_column: str | None = None) -> LengthSamples:
    """(prompt, output) pairs of any supported file, by content (see the module doc)."""

    path = local_path(path_text)
    if not path.is_file():
        raise FileNotFoundError(f"{_q(part)}: no such file {_q(path_text)}")
    if path.suffix == ".jsonl":
        if prompt_column not in (None, "input_length") or output_column not in (
                None, "output_length"):
            raise WorkloadSpecError(f"{_q(part)}: a Mooncake JSONL has only the length fields "
                                    "input_length and output_length")
        return LengthSamples.from_workload(load_mooncake(path, spread_buckets=False))
    if _is_azure_csv(path):
        prompt_default, output_default = "ContextTokens", "GeneratedTokens"
    else:
        prompt_default, output_default = "num_prefill_tokens", "num_decode_tokens"
    return load_lengths(path, prompt_column or prompt_default, output_column or output_default)


def _load_one_column(path_text: str, part: str, role: str, column: str | None) -> IntArray:

    path = local_path(path_text)
    if column is None or path.suffix == ".jsonl":
        # The role picks the column: a prompt distribution reads the prompt column.
        samples = (_load_samples(path_text, part, prompt_column=column) if role == "prompt"
                   else _load_samples(path_text, part, output_column=column))
        return samples.prompt if role == "prompt" else samples.output
    if not path.is_file():
        raise FileNotFoundError(f"{_q(part)}: no such file {_q(path_text)}")
    return load_column(path, column)


def split_top_level(text: str, separators: str = ",") -> list[str]:
    """Split on `separators` outside parentheses (so `lognormal(a,b)` stays one part)."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise WorkloadSpecError(f"unbalanced ')' in {_q(text)}")
        if char in separators and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise WorkloadSpecError(f"unbalanced '(' in {_q(text)}")
    parts.append("".join(current))
    return parts


def parse_call(text: str) -> tuple[str, list[str]]:
    """`name(arg;arg,...)` -> (name, args); args split on ';' or ','."""
    text = text.strip()
    open_at = text.find("(")
    if open_at <= 0 or not text.endswith(")"):
        raise WorkloadSpecError(f"{_q(text)}: expected NAME(ARGS), e.g. uniform(lo=1;hi=10)")
    name = text[:open_at].strip().lower()
    body = text[open_at + 1:-1]
    args = [a.strip() for a in split_top_level(body, ",;")] if body.strip() else []
    if any(not a for a in args):
        raise WorkloadSpecError(f"{_q(text)}: empty argument")
    return name, args


def parse_int(text: str, what: str) -> int:
    """An int, also written as an integral float ('1e3'); errors name `what`."""
    what = cut(what, 160)
    if len(text.strip().lstrip("+-")) > 30:  # no count or seed has 30 digits; keeps errors short
        raise WorkloadSpecError(f"{what}: {shown(text)} is too large")
    try:
        return int(text)
    except ValueError:  # also past 4300 digits: then float() below says inf, not an integer
        pass
    try:
        value = float(text)
    except ValueError:
        raise WorkloadSpecError(f"{what}: {shown(text)} is not an integer") from None
    if not value.is_integer():
        raise WorkloadSpecError(f"{what}: {shown(text)} is not an integer")
    return int(value)


def parse_float(text: str, what: str) -> float:
    what = cut(what, 160)
    try:
        value = float(text)
    except ValueError:
        raise WorkloadSpecError(f"{what}: {shown(text)} is not a number") from None
    if not math.isfinite(value):
        raise WorkloadSpecError(f"{what}: {shown(text)} is not finite")
    return value


def parse_length(text: str, role: str = "prompt") -> LengthDistribution:
    """One LENGTH of the grammar in the module doc; `role` ("prompt" or "output") picks the
    default column of `empirical(PATH)`."""

    name, args = parse_call(text)
    if name == "fixed":
        if len(args) != 1:
            raise WorkloadSpecError(f"{_q(text)}: fixed takes one integer, e.g. fixed(512)")
        value = parse_int(args[0], text)
        return _built(text, lambda: Fixed(value))
    if name == "empirical":
        if not args or "=" in args[0]:
            raise WorkloadSpecError(f"{_q(text)}: empirical needs a PATH first, "
                                    "e.g. empirical(lengths.csv;column=num_prefill_tokens)")
        column = _keyed(args[1:], text, ("column",)).get("column")
        values = _load_one_column(args[0], text, role, column)
        return _built(text, lambda: Empirical(values, text))
    if name not in _LENGTH_KEYS:
        raise WorkloadSpecError(f"{_q(text)}: unknown length distribution {_q(name)} (use fixed, "
                                "uniform, zipf, lognormal or empirical)")
    keyed = _keyed(args, text, _LENGTH_KEYS[name])
    if name == "uniform":
        _require(keyed, text, ("lo", "hi"))
        lo, hi = parse_int(keyed["lo"], text), parse_int(keyed["hi"], text)
        return _built(text, lambda: Uniform(lo, hi))
    if name == "zipf":
        _require(keyed, text, ("a", "max"))
        a = parse_float(keyed["a"], text)
        low, high = parse_int(keyed.get("min", "1"), text), parse_int(keyed["max"], text)
        return _built(text, lambda: Zipf(a, low, high))
    if name == "lognormal":
        _require(keyed, text, ("median", "sigma"))
        median, sigma = parse_float(keyed["median"], text), parse_float(keyed["sigma"], text)
        floor = parse_int(keyed.get("min", "1"), text)
        ceiling = None if "max" not in keyed else parse_int(keyed["max"], text)
        return _built(text, lambda: LogNormal(median, sigma, floor, ceiling))
    raise AssertionError(f"unhandled length distribution {_q(name)}")  # _LENGTH_KEYS is stale


def parse_paired(text: str) -> LengthSamples:
    """One SOURCE of the grammar: PATH or empirical(PATH;prompt_column=..;output_column=..)."""
    if not text.lower().startswith("empirical("):
        if not text:
            raise WorkloadSpecError("'paired=': missing PATH")
        return _load_samples(text, f"paired={text}")
    _, args = parse_call(text)
    if not args or "=" in args[0]:
        raise WorkloadSpecError(f"{_q(text)}: empirical needs a PATH first")
    options = _keyed(args[1:], text, ("prompt_column", "output_column"))
    return _load_samples(args[0], text, options.get("prompt_column"),
                         options.get("output_column"))


_LENGTH_KEYS: dict[str, tuple[str, ...]] = {
    "uniform": ("lo", "hi"),
    "zipf": ("a", "min", "max"),
    "lognormal": ("median", "sigma", "min", "max"),
}


def _keyed(args: Sequence[str], part: str, allowed: Sequence[str], *,
           where: str | None = None) -> dict[str, str]:
    """KEY=VALUE arguments of `part` (keys lower-cased); errors start with `where`
    (default: the quoted part)."""
    where = _q(part) if where is None else where
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not key or not value:
            raise WorkloadSpecError(f"{where}: {_q(arg)} is not KEY=VALUE")
        if key not in allowed:
            raise WorkloadSpecError(f"{where}: unknown key {_q(key)} (allowed: "
                                    f"{', '.join(allowed) or 'none'})")
        if key in out:
            raise WorkloadSpecError(f"{where}: {_q(key)} given twice")
        out[key] = value
    return out


def _require(keyed: dict[str, str], part: str, keys: Sequence[str], *,
             where: str | None = None) -> None:
    missing = [k for k in keys if k not in keyed]
    if missing:
        where = _q(part) if where is None else where
        raise WorkloadSpecError(f"{where}: missing {', '.join(missing)}")


def _built(part: str, build: Callable[[], _T]) -> _T:
    # Constructors raise plain ValueError on bad values; re-raise naming the spec part.
    try:
        return build()
    except WorkloadSpecError:
        raise
    except ValueError as error:
        raise WorkloadSpecError(f"{_q(part)}: {error}") from None


def _synthetic_from_spec(body: str, spec: str, default_seed: int) -> Workload:

    where = f"workload spec {_q(spec)}"
    options = _keyed(split_top_level(body), body, _SYNTHETIC_KEYS, where=where)
    _require(options, body, ("n", "rate"), where=where)
    n = parse_int(options["n"], "n=" + cut(options["n"]))
    rate = parse_float(options["rate"], "rate=" + cut(options["rate"]))
    arrival = options.get("arrival", "poisson").lower()
    if arrival not in ARRIVALS:
        raise WorkloadSpecError(f"workload spec {_q(spec)}: arrival={_q(arrival)} (use "
                                f"{', '.join(ARRIVALS)})")
    cv = parse_float(options.get("cv", "1"), "cv=" + cut(options.get("cv", "1")))
    if "cv" in options and arrival != "gamma":
        raise WorkloadSpecError(f"workload spec {_q(spec)}: cv applies to arrival=gamma only")
    seed = parse_int(options["seed"], "seed=" + cut(options["seed"])) if "seed" in options \
        else default_seed
    if seed < 0:
        raise WorkloadSpecError(f"workload spec {_q(spec)}: seed must be >= 0, got {seed}")
    paired = parse_paired(options["paired"]) if "paired" in options else None
    if paired is not None and ("prompt" in options or "output" in options):
        raise WorkloadSpecError(f"workload spec {_q(spec)}: give either paired= or "
                                "prompt= and output=, not both")
    if paired is None and ("prompt" not in options or "output" not in options):
        raise WorkloadSpecError(f"workload spec {_q(spec)}: needs prompt= and output= "
                                "(or paired=)")
    prompt = parse_length(options["prompt"], "prompt") if "prompt" in options else None
    output = parse_length(options["output"], "output") if "output" in options else None
    try:
        workload = synthetic_workload(n, rate, arrival=arrival, cv=cv, prompt=prompt,
                                      output=output, seed=seed, paired=paired)
    except WorkloadSpecError:
        raise
    except ValueError as error:
        raise WorkloadSpecError(f"workload spec {_q(spec)}: {error}") from None
    return Workload(workload.name, workload.requests, (f"spec: {spec}", *workload.notes))
