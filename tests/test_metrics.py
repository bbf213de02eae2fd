"""Run metrics: JSONL and TensorBoard scalars, process-0-only writing, non-finite counting, progress line."""
import io
import json
import math

import numpy as np
import pytest

from mgrpo_jax.metrics import (MetricsWriter, Progress, format_duration, read_metrics_jsonl,
                               read_tensorboard_scalars)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_jsonl_and_tensorboard_scalars(tmp_path):
    with MetricsWriter(tmp_path, process_index=0) as writer:
        writer.write(1, {"main/loss": 0.5, "main/reward_mean": np.float32(0.25), "sub/count": np.int64(3)})
        writer.write(2, {"main/loss": float("nan"), "main/reward_mean": np.array(0.75), "sub/ok": True})
        writer.write(3, {"main/loss": float("inf")})
        assert writer.non_finite == {"main/loss": 2} and writer.num_non_finite == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "main/loss": 0.5, "main/reward_mean": 0.25, "sub/count": 3.0}
    assert lines[1]["step"] == 2 and math.isnan(lines[1]["main/loss"]) and lines[1]["sub/ok"] == 1.0
    assert lines[2] == {"step": 3, "main/loss": math.inf}
    scalars = read_tensorboard_scalars(tmp_path / "tb")
    assert set(scalars) == {"main/loss", "main/reward_mean", "sub/count", "sub/ok"}
    assert scalars["main/reward_mean"] == [(1, 0.25), (2, 0.75)]
    assert scalars["main/loss"][0] == (1, 0.5) and math.isnan(scalars["main/loss"][1][1])


def test_resumed_run_appends_and_reader_keeps_last(tmp_path):
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:
        writer.write(1, {"a": 1.0})
        writer.write(2, {"a": 2.0})
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:  # resumed from step 1
        writer.write(2, {"a": 20.0})
    assert [r["a"] for r in read_metrics_jsonl(tmp_path)] == [1.0, 20.0]
    assert len(read_metrics_jsonl(tmp_path / "metrics.jsonl", last_per_step=False)) == 3
    assert not (tmp_path / "tb").exists()


def test_only_process_zero_writes(tmp_path):
    with MetricsWriter(tmp_path, process_index=1) as writer:
        writer.write(1, {"x": float("nan")})
        assert writer.num_non_finite == 1  # still counted, for that process's own checks
    assert list(tmp_path.iterdir()) == []


def test_bad_metric_values_are_named(tmp_path):
    with MetricsWriter(tmp_path, process_index=0, tensorboard=False) as writer:
        with pytest.raises(TypeError, match="metric 'main/hist' is a ndarray"):
            writer.write(1, {"main/hist": np.zeros(3)})
        with pytest.raises(ValueError, match="'step' is reserved"):
            writer.write(1, {"step": 1})


def test_progress_eta_and_rate_with_fake_clock():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(100, start_step=10, every=5, window=2, clock=clock, stream=out, is_tty=False,
                        process_index=0, keys=("main/reward_mean", "main/loss", "absent"))
    clock.now += 4.0
    assert progress.update(12, {"main/loss": 0.5}) is None  # not a multiple of every=5
    assert progress.steps_per_s() == pytest.approx(0.5) and progress.eta_s() == pytest.approx(176.0)
    clock.now += 1.0
    line = progress.update(15, {"main/reward_mean": 0.123456, "main/loss": -0.5})
    # window=2: the rate covers (t=100, step 10) .. (t=105, step 15): 1 step/s, 85 steps left.
    assert line == "step 15/100 (15%) | 1 step/s | ETA 0:01:25 | main/reward_mean 0.1235 | main/loss -0.5"
    clock.now += 1.0
    progress.update(16)
    assert progress.steps_per_s() == pytest.approx(4 / 2)  # the window drops (t=100, 10): (104, 12)..(106, 16)
    assert out.getvalue() == line + "\n"


def test_progress_window_forgets_slow_first_step():
    clock = FakeClock()
    progress = Progress(1000, window=3, clock=clock, stream=io.StringIO(), is_tty=False, process_index=0)
    clock.now += 60.0  # compilation
    progress.update(1)
    for step in range(2, 6):
        clock.now += 0.5
        progress.update(step)
    assert progress.steps_per_s() == pytest.approx(2.0)
    assert progress.eta_s() == pytest.approx(995 / 2.0)


def test_progress_tty_redraws_in_place():
    clock, out = FakeClock(), io.StringIO()
    progress = Progress(3, clock=clock, stream=out, is_tty=True, process_index=0, keys=())
    for step in (1, 2, 3):
        clock.now += 2.0
        progress.update(step)
    text = out.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 1 and text.endswith("ETA 0:00:00\n")
    assert "\rstep 2/3 (67%) | 0.5 step/s | ETA 0:00:02" in text


def test_format_duration():
    assert format_duration(3725.4) == "1:02:05" and format_duration(float("nan")) == "?"


def test_close_on_a_full_disk_still_closes_tensorboard(tmp_path):
    """metrics.jsonl on /dev/full (every write fails with ENOSPC): close() raises that error once, and the
    TensorBoard file is still closed (its scalars are on disk)."""
    import errno
    import os

    os.symlink("/dev/full", tmp_path / "metrics.jsonl")
    writer = MetricsWriter(tmp_path, process_index=0)
    writer.write(1, {"main/loss": 0.5})  # buffered: the disk is not touched yet
    with pytest.raises(OSError) as e:
        writer.close()
    assert e.value.errno == errno.ENOSPC
    assert read_tensorboard_scalars(tmp_path / "tb") == {"main/loss": [(1, 0.5)]}
    writer.close()  # idempotent: nothing left to close
