"""Run metrics: TensorBoard scalars, a JSONL log, and a console progress line.

- `MetricsWriter(workdir)` (a local path or an object-store URL, mirrored: `mgrpo_jax.workdir`): per step, every
  scalar goes to TensorBoard (tensorboardX, `<workdir>/tb`, the key is
  the tag: "main/loss" groups under "main") and one line `{"step": n, ...all scalars}` goes to
  `<workdir>/metrics.jsonl`, which tests and scripts read without TensorBoard (`read_metrics_jsonl`). Only
  process 0 writes in a multi-process run. Non-finite values (NaN, inf) are written as they are (Python's
  json reads NaN/Infinity back) and counted per key (`non_finite`), never raised: a diverging run should leave
  a record of how it diverged.
- `Progress(total_steps)`: "step 20/100 (20%) | 1.25 step/s | ETA 0:01:04 | main/reward_mean 0.512 | ..." —
  redrawn in place with `\\r` when the stream is a terminal, a plain line every `every` steps otherwise (logs
  stay readable). Steps/s is measured over a sliding window of recent updates, so the first step's compile
  time stops skewing the ETA after a few steps.

The JSONL file is opened in append mode: a resumed run continues the same file, and steps between the last
checkpoint and the interruption appear twice; readers keep the last line for a step (`read_metrics_jsonl`
with `last_per_step=True`).
"""
from __future__ import annotations

import collections
import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

import numpy as np

from mgrpo_jax.workdir import Mirror, is_remote, scratch_dir

JSONL_NAME = "metrics.jsonl"
TB_SUBDIR = "tb"
DEFAULT_PROGRESS_KEYS = ("main/reward_mean", "main/accuracy", "sub/reward_mean", "main/loss")


def _process_index(process_index: int | None) -> int:
    if process_index is not None:
        return process_index
    import jax  # deferred: only a multi-process run needs to ask, and metrics code is otherwise jax-free

    return jax.process_index()


def to_scalar(key: str, value: Any) -> float:
    """A Python/NumPy/JAX number or 0-d array -> float. Raises TypeError naming the key for anything else."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value)
    if hasattr(value, "shape") and hasattr(value, "dtype") and tuple(value.shape) in ((), (1,)):
        return float(np.asarray(value).reshape(()))
    raise TypeError(f"metric {key!r} is a {type(value).__name__} ({str(value)[:80]}), not a scalar number; "
                    "log only numbers (reduce arrays to a mean or count first)")


class MetricsWriter:
    """TensorBoard + JSONL scalars for one run (module docstring). Use as a context manager or call close().

    workdir: the run's directory. process_index: default jax.process_index(); only 0 writes.
    tensorboard: False to write only the JSONL file.
    """

    def __init__(self, workdir: str | os.PathLike, *, process_index: int | None = None, tensorboard: bool = True):
        self.workdir = os.fspath(workdir)
        self.enabled = _process_index(process_index) == 0
        self.non_finite: collections.Counter[str] = collections.Counter()
        self._tb = None
        self._jsonl: TextIO | None = None
        self._mirror = None
        if not self.enabled:
            return
        local = self.workdir
        if is_remote(self.workdir):  # an object store: write a local mirror, upload it whole at every flush
            from etils import epath

            local = os.path.join(scratch_dir(self.workdir), "metrics_mirror")
            self._mirror = Mirror(local, epath.Path(self.workdir))
            self._mirror.restore([JSONL_NAME])
        os.makedirs(local, exist_ok=True)
        self.jsonl_path = os.path.join(local, JSONL_NAME)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter  # deferred: it imports protobuf and friends

            self._tb = SummaryWriter(logdir=os.path.join(local, TB_SUBDIR))

    @property
    def num_non_finite(self) -> int:
        return sum(self.non_finite.values())

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        """Writes the scalars of one step; returns them as floats. Keys must be str; "step" is reserved."""
        if "step" in metrics:
            raise ValueError("metric key 'step' is reserved for the step number; rename the metric")
        scalars = {str(k): to_scalar(k, v) for k, v in metrics.items()}
        for k, v in scalars.items():
            if not math.isfinite(v):
                self.non_finite[k] += 1
        if not self.enabled:
            return scalars
        if self._jsonl is None:
            raise RuntimeError("MetricsWriter is closed")
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=int(step))
        return scalars

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()
        if self._mirror is not None:
            self._mirror.sync()

    def close(self) -> None:
        """Closes both outputs even if one fails (a full disk); raises the first error. Idempotent."""
        outputs, self._jsonl, self._tb = (self._jsonl, self._tb), None, None
        errors = []
        for output in outputs:
            if output is not None:
                try:
                    output.close()
                except Exception as e:  # noqa: BLE001 - close the other one first
                    errors.append(e)
        if self._mirror is not None and not errors:
            mirror, self._mirror = self._mirror, None
            mirror.sync()
        if errors:
            raise errors[0]

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics_jsonl(path: str | os.PathLike, *, last_per_step: bool = True) -> list[dict[str, float]]:
    """The lines of a metrics.jsonl file (a workdir is accepted too), in step order. With `last_per_step`, a step
    logged twice (a resumed run) keeps its last line."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, JSONL_NAME)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not last_per_step:
        return rows
    by_step = {r["step"]: r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def read_tensorboard_scalars(logdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} from the event files under `logdir`, without TensorBoard: TFRecord framing
    (u64 length, u32 crc, data, u32 crc) around tensorboardX's `Event` protos. CRCs are not checked."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
    for root, _, files in os.walk(os.fspath(logdir)):
        for name in sorted(f for f in files if "tfevents" in f):
            with open(os.path.join(root, name), "rb") as f:
                data = f.read()
            pos = 0
            while pos + 12 <= len(data):
                (length,) = struct.unpack("<Q", data[pos:pos + 8])
                event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
                pos += 12 + length + 4
                for value in event.summary.value:
                    out[value.tag].append((int(event.step), float(value.simple_value)))
    return dict(out)


# ------------------------------------------------------------------------------------------ progress


def format_duration(seconds: float) -> str:
    """H:MM:SS (or "?" when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _format_value(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


class Progress:
    """A one-line console progress report (module docstring).

    total_steps: the step count the run ends at. start_step: where it started (a resumed run), so the rate is
    not inflated by steps done before. keys: metrics shown, in order, when present. every: print interval when
    the stream is not a terminal. window: updates the steps/s average covers. clock: seconds (injectable for
    tests). is_tty: default `stream.isatty()`. process_index: only process 0 prints (default jax's).
    """

    def __init__(self, total_steps: int, *, start_step: int = 0, keys: Sequence[str] = DEFAULT_PROGRESS_KEYS,
                 every: int = 10, window: int = 20, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, is_tty: bool | None = None,
                 process_index: int | None = None):
        if total_steps < 1 or every < 1 or window < 1:
            raise ValueError(f"Progress needs total_steps, every and window >= 1; got {total_steps}, {every}, {window}")
        self.total_steps, self.keys, self.every = total_steps, tuple(keys), every
        self.stream = sys.stdout if stream is None else stream
        self.clock = clock
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)()) if is_tty is None else is_tty
        self.enabled = _process_index(process_index) == 0
        self._history: collections.deque[tuple[float, int]] = collections.deque([(clock(), start_step)],
                                                                                maxlen=window + 1)
        self._last_len = 0

    def steps_per_s(self) -> float:
        (t0, s0), (t1, s1) = self._history[0], self._history[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else float("nan")

    def eta_s(self) -> float:
        rate = self.steps_per_s()
        return (self.total_steps - self._history[-1][1]) / rate if rate > 0 else float("nan")

    def format_line(self, step: int, metrics: Mapping[str, Any] | None = None) -> str:
        """The progress line for `step` (after `record`-ing it)."""
        metrics = metrics or {}
        rate = self.steps_per_s()
        parts = [f"step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)",
                 f"{rate:.3g} step/s" if math.isfinite(rate) else "? step/s", f"ETA {format_duration(self.eta_s())}"]
        parts += [f"{k} {_format_value(to_scalar(k, metrics[k]))}" for k in self.keys if k in metrics]
        return " | ".join(parts)

    def record(self, step: int) -> None:
        self._history.append((self.clock(), step))

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> str | None:
        """Records that `step` steps are done and prints the line when due; returns the line printed, or None."""
        self.record(step)
        if not self.enabled:
            return None
        done = step >= self.total_steps
        if not (self.is_tty or done or step % self.every == 0):
            return None
        line = self.format_line(step, metrics)
        if self.is_tty:  # redraw in place; pad over a longer previous line
            self.stream.write("\r" + line.ljust(self._last_len) + ("\n" if done else ""))
            self._last_len = 0 if done else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def close(self) -> None:
        """Ends an in-place line with a newline (e.g. when a run stops early)."""
        if self.enabled and self.is_tty and self._last_len:
            self.stream.write("\n")
            self.stream.flush()
            self._last_len = 0
