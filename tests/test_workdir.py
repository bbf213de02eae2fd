"""Run directories on object stores: a clear start-up error without the backend, a local scratch directory for
regenerated files, and metrics mirrored to the remote directory (here a second local directory stands in for
the bucket: the mirror only uses epath.Path's exists / read_bytes / write_bytes / mkdir)."""
import importlib.util
import json
import os

import pytest
from etils import epath

from mgrpo_jax.metrics import MetricsWriter, read_metrics_jsonl
from mgrpo_jax.workdir import Mirror, check_workdir, is_remote, scratch_dir


def test_gs_workdir_without_gcsfs_names_the_fix(tmp_path):
    assert importlib.util.find_spec("gcsfs") is None  # the test extra does not install it (only the tpu extra)
    with pytest.raises(ValueError, match=r"needs the 'gcsfs' package.*pip install -e '\.\[tpu\]'"):
        check_workdir("gs://bucket/run")
    assert not os.path.exists("gs:")  # the old failure mode: a local folder named gs:
    with pytest.raises(ValueError, match="ftp:// scheme is not supported"):
        check_workdir("ftp://host/run")


def test_scratch_dir_is_local_and_stable(tmp_path, monkeypatch):
    monkeypatch.setenv("MGRPO_SCRATCH", str(tmp_path / "scratch"))
    assert scratch_dir(str(tmp_path)) == str(tmp_path) and not is_remote(str(tmp_path))
    a, b = scratch_dir("gs://bucket/run"), scratch_dir("gs://bucket/run")
    assert a == b != scratch_dir("gs://bucket/other") and a.startswith(str(tmp_path / "scratch")) and os.path.isdir(a)


def test_mirror_uploads_metrics_and_a_restart_appends(tmp_path):
    remote = epath.Path(tmp_path / "bucket")
    remote.mkdir()
    mirror = Mirror(str(tmp_path / "local"), remote)
    writer = MetricsWriter(mirror.local_dir, tensorboard=True, process_index=0)
    writer.write(1, {"loss": 0.5})
    writer.close()
    mirror.sync()
    assert [r["step"] for r in read_metrics_jsonl(str(tmp_path / "bucket" / "metrics.jsonl"))] == [1]
    assert any(p.name.startswith("events") for p in (remote / "tb").iterdir())
    # A new machine: an empty local mirror restores the remote log, then appends to it.
    again = Mirror(str(tmp_path / "local2"), remote)
    again.restore(["metrics.jsonl", "missing.txt"])
    with open(os.path.join(again.local_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 2, "loss": 0.25}) + "\n")
    again.sync()
    assert [r["step"] for r in read_metrics_jsonl(str(tmp_path / "bucket" / "metrics.jsonl"))] == [1, 2]
