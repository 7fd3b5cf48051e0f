"""Training state saved during a run, so that a killed run resumes where it was saved.

A sweep resumes at the level of runs: a finished run is never trained again. A run killed
halfway (SIGKILL, a lost node, the end of a machine lease) would start over, which for a
run of hours is most of the cost. With checkpoints on, the engine saves the whole training
state at an evaluation point (``--checkpoint-every`` seconds apart at least) into
``OUT/runs/.partial/KEY.pt``; a rerun of the same command finds it and goes on from that
step. Everything that decides the numbers is saved: weights and buffers, the optimiser,
the learning-rate schedule, the gradient scaler, the task weighting's state, the random
number generators, the position in the method's schedule (replayed from its seed, as the
batches are), the validation curve and the best checkpoint. So a resumed run gives the
same result, bit for bit, as one that was never stopped (tests/test_checkpoint.py). The
file is removed once the run's result is written.

The file holds tensors and plain containers only and is read with ``weights_only=True``. A
file that cannot be read, or that belongs to another run key, step plan or torch version,
is set aside with a warning and the run starts over.
"""
from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

FORMAT = 1
log = logging.getLogger(__name__)


def rng_state() -> dict:
    """The global generators (Python, NumPy, torch, CUDA) as tensors and plain values."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """``random.setstate`` wants the nested tuples back (a round trip may give lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class RunCheckpoint:
    """The checkpoint file of one run: ``every`` seconds at least between saves (0: at every
    evaluation point)."""

    def __init__(self, path: str | Path, every: float = 60.0) -> None:
        self.path, self.every = Path(path), float(every)
        self.key = self.path.stem
        self.saves, self.seconds = 0, 0.0
        self._last = time.monotonic()
        self._broken = False

    def due(self) -> bool:
        return not self._broken and time.monotonic() - self._last >= self.every

    def save(self, state: dict) -> None:
        """Write ``state`` atomically; a failure to write is logged and turns saving off (the
        run goes on: a checkpoint only saves time)."""
        start = time.perf_counter()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"format": FORMAT, "key": self.key, "torch": str(torch.__version__), "saved": time.time(),
                        "saves": self.saves + 1, **state}, tmp)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("mtlbench: cannot save a checkpoint to %s (%s); this run goes on without", self.path, exc)
            self._broken = True
            tmp.unlink(missing_ok=True)
        else:
            self.saves += 1
        self._last = time.monotonic()
        self.seconds += time.perf_counter() - start

    def load(self, steps_planned: int) -> dict | None:
        """The saved state of this run, or None (no file, or one that does not fit: set aside)."""
        if not self.path.exists():
            return None
        why = None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file
            first = (str(exc).strip().splitlines() or [""])[0]
            state, why = None, f"unreadable ({type(exc).__name__}: {first})"
        if state is not None:
            expected = {"format": FORMAT, "key": self.key, "steps_planned": steps_planned,
                        "torch": str(torch.__version__)}
            wrong = [k for k, v in expected.items() if state.get(k) != v]
            if wrong:
                why = "another " + ", ".join(f"{k} ({state.get(k)!r}, not {expected[k]!r})" for k in wrong)
        if why is not None:
            aside = self.path.with_name(self.path.name + ".set-aside")
            os.replace(self.path, aside)
            log.warning("mtlbench: checkpoint %s is %s; set aside as %s, the run starts over",
                        self.path, why, aside.name)
            return None
        self._last = time.monotonic()
        self.saves = state.get("saves", 0)  # counted over every attempt of the run
        return state

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
