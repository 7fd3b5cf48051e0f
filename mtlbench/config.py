"""Run configuration: one dataclass that, fully resolved, reproduces a run from its own file."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field

from mtlbench.errors import MtlbenchError


@dataclass
class RunConfig:
    """Everything that determines a run's numbers. Written into every result."""

    method: str = "tr"
    tasks: int = 40
    dataset: str = "synthetic"
    backbone: str = "convnet"
    sigma: float | None = 0.5     # task routing's sharing ratio; None for methods without one
    schedule: str = ""            # "" = the method's default ("sample" for tr, "all" otherwise)
    steps_per_task: int = 20      # supervised batches every task gets (the equal budget)
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 250
    task_names: list = field(default_factory=list)  # pick tasks by name instead of the first T
    holdout: float = 0.0          # carve this fraction of holdout_split off as the evaluation split
    holdout_split: str = "train"
    precision: str = "fp32"       # fp32, bf16 or fp16 (autocast; fp16 adds a gradient scaler)
    tr_impl: str = "auto"         # task routing: dense, compact or auto ("" for other methods)
    deterministic: bool = True    # CUDA: deterministic kernels, so the same seed gives the same numbers
    dataset_options: dict = field(default_factory=dict)
    backbone_options: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)  # the method's own options, as given

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short, stable hash of the configuration: the identity of a run for resuming."""
        values = self.to_dict()
        # Fields added later are left out at their defaults: runs written before keep their keys.
        if not values["method_options"]:
            del values["method_options"]
        if values["deterministic"]:
            del values["deterministic"]
        blob = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def make_config(cls: type, options: dict, what: str) -> object:
    """Build dataclass ``cls`` from ``options``; unknown keys and bad values are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise MtlbenchError(f"unknown option(s) {', '.join(unknown)} for {what}; "
                            f"valid: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"{what} option {k}") for k, v in options.items()}
    return cls(**values)


def resolved_options(cls: type, options: dict, what: str) -> dict:
    """``options`` validated and completed with ``cls``'s defaults, as plain JSON values."""
    return json.loads(json.dumps(dataclasses.asdict(make_config(cls, options, what))))


def _coerce(value: object, hint: object, what: str) -> object:
    """Turn a CLI string into the field's type (int, float, bool, str, tuple of ints)."""
    if not isinstance(value, str):
        return value
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if hint in (int, float):
            return hint(value)
        if origin is tuple:
            return tuple(int(v) for v in value.replace("-", ",").split(",") if v)
    except ValueError:
        raise MtlbenchError(f"{what}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def parse_options(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``["dataset.relatedness=0.2", "method.inference=loop"]`` -> nested dict by target."""
    out: dict[str, dict[str, str]] = {"dataset": {}, "backbone": {}, "method": {}}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        target, dot, name = key.partition(".")
        if not sep or not dot or target not in out or not name:
            raise MtlbenchError(f"option {pair!r} must look like dataset.KEY=VALUE, backbone.KEY=VALUE "
                                "or method.KEY=VALUE")
        out[target][name] = value
    return out
