"""Run configuration, and the one definition of "the same setting".

A :class:`RunConfig`, fully resolved (every dataset, backbone and method option with its
default filled in), reproduces a run from its own file. Method options live in
``method_options`` as the method resolved them; the core names none of them.

A run's **key** hashes its whole configuration (the identity used to resume). Its
**setting** (:func:`setting`) is the configuration minus the seed and minus the method's
implementation choices that are tested to give the same numbers: Δm, aggregation across
seeds, reports and ``compare`` all group and match runs by it, and nothing else.
"""
from __future__ import annotations

import copy
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
    method_options: dict = field(default_factory=dict)  # resolved by the method
    tasks: int = 40
    task_names: list = field(default_factory=list)  # pick tasks by name instead of the first T
    dataset: str = "synthetic"
    dataset_options: dict = field(default_factory=dict)
    backbone: str = "convnet"
    backbone_options: dict = field(default_factory=dict)
    # The budget: one of the two (the dataset's default when neither is given).
    epochs: float | None = None          # passes over the training images each task gets
    steps_per_task: int | None = None    # supervised batches each task gets
    batch_size: int = 64
    lr: float = 3e-3
    lr_schedule: str = "cosine"   # cosine decay after a linear warm-up, or constant
    warmup: float = 0.05          # fraction of the steps spent warming up (cosine only)
    optimizer: str = "adam"
    weight_decay: float = 0.0
    pos_weight: str = "none"      # "auto": each task's BCE weighs positives by negatives/positives
    val_fraction: float = 0.1     # carved off the training split for evaluation during training
    eval_every: str = "auto"      # "auto" (10 evaluations), N steps, or Xep (every X epochs)
    patience: int = 0             # stop after this many evaluations without improvement (0: never)
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 250
    holdout: float = 0.0          # carve this fraction of holdout_split off as the test split
    holdout_split: str = "train"
    precision: str = "fp32"       # fp32, bf16 or fp16 (autocast; fp16 adds a gradient scaler)
    deterministic: bool = True    # CUDA: deterministic kernels, so the same seed gives the same numbers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """A short, stable hash of the whole configuration: the identity of a run for resuming."""
        return digest(self.to_dict())


def digest(obj: object) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def same_numbers(value: object) -> object:
    """``value`` with every whole float written as an int, so that equal values are one
    setting however they were given (``--epochs 4`` is the dataset default's 4)."""
    if isinstance(value, dict):
        return {k: same_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [same_numbers(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def as_now(method_options: dict) -> dict:
    """A run file's method options as this version records them, updated in place: a
    ``sample`` run recorded without ``stream`` was written before that option existed and
    ran what is now ``stream=aligned``."""
    if method_options.get("schedule") == "sample":
        method_options.setdefault("stream", "aligned")
    return method_options


def setting(config: dict) -> dict:
    """A run's setting: its configuration minus the seed and minus the method's implementation
    options (``Method.implementation_options``, tested to give the same numbers), with equal
    numbers written alike (4.0 is 4), and old files' options read as now (``as_now``)."""
    out = same_numbers(copy.deepcopy(config))
    out.pop("seed", None)
    options = as_now(out.get("method_options") or {})
    for name in _implementation_options(out.get("method")):
        options.pop(name, None)
    return out


def setting_key(config: dict) -> str:
    """The identity of a setting: runs with the same key differ at most in the seed."""
    return digest(setting(config))


def reference_key(config: dict, ignore: tuple[str, ...] = ()) -> str:
    """What a Δm reference must share with a run: the setting without the method and its
    options (the reference is the registry's reference method in the same setting), and
    without the options in ``ignore`` (those tuned on validation, each side at its best)."""
    out = setting(config)
    out.pop("method", None)
    out.pop("method_options", None)
    for name in ignore:
        out.pop(name, None)
    return digest(out)


def _implementation_options(method: str | None) -> tuple[str, ...]:
    from mtlbench.registry import METHODS
    try:
        return tuple(METHODS.get(method).implementation_options) if method else ()
    except MtlbenchError:  # a method from a plugin that is not installed here
        return ()


def make_config(cls: type, options: dict, what: str) -> object:
    """Build dataclass ``cls`` from ``options``; unknown keys and bad values are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise MtlbenchError(f"unknown option(s) {', '.join(unknown)} for {what}; "
                            f"valid: {', '.join(sorted(fields)) or 'none'}")
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
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:  # ``X | None``: read as X
        if value.lower() == "none":
            return None
        hint = args[0]
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if hint in (int, float):
            number = hint(value)
            if hint is float and number != number:
                raise ValueError(value)
            return number
        if origin is tuple:
            return tuple(int(v) for v in value.replace("-", ",").split(",") if v)
    except ValueError:
        raise MtlbenchError(f"{what}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


TARGETS = ("dataset", "backbone", "method", "weighting")


def parse_options(pairs: list[str]) -> dict[str, dict[str, str]]:
    """``["dataset.relatedness=0.2", "method.inference=loop"]`` -> nested dict by target."""
    out: dict[str, dict[str, str]] = {t: {} for t in TARGETS}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        target, dot, name = key.partition(".")
        if not sep or not dot or target not in out or not name:
            raise MtlbenchError(f"option {pair!r} must look like TARGET.KEY=VALUE with TARGET one of "
                                f"{', '.join(TARGETS)}")
        out[target][name] = value
    return out
