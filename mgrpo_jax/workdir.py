"""Run directories: a local path, or an object-store URL (`gs://bucket/run`, `s3://...`) through etils.epath.

With a URL, checkpoints go straight to the store (orbax writes there natively), metrics are written to a local
mirror and uploaded whole at every flush (object stores have no append), and what is regenerated from the config
(the generated task's files, a locally trained tokenizer) stays in a local scratch directory
(`$MGRPO_SCRATCH`, default `~/.cache/mgrpo_jax/runs/<hash of the URL>`). `gs://` needs `gcsfs` (the `tpu`
extra: `pip install -e '.[tpu]'`), `s3://` needs `s3fs`; without them the run stops at start-up naming the fix,
instead of writing to a local folder called `gs:`.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os

from etils import epath

# URL scheme -> the fsspec package etils.epath needs for it.
_BACKENDS = {"gs": "gcsfs", "s3": "s3fs"}


def is_remote(workdir: str | os.PathLike) -> bool:
    return "://" in os.fspath(workdir)


def check_workdir(workdir: str | os.PathLike) -> None:
    """Creates the run directory; for a URL, checks its scheme and backend first (ValueError naming the fix)."""
    workdir = os.fspath(workdir)
    if not is_remote(workdir):
        os.makedirs(workdir, exist_ok=True)
        return
    scheme = workdir.split("://", 1)[0]
    if scheme not in _BACKENDS:
        raise ValueError(f"workdir {workdir!r}: the {scheme}:// scheme is not supported; use a local path, gs:// or "
                         "s3://")
    package = _BACKENDS[scheme]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"workdir {workdir!r} needs the {package!r} package to reach {scheme}:// (etils.epath "
                         f"goes through fsspec): pip install -e '.[tpu]' (or pip install {package}), or use a "
                         "local or mounted path")
    try:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - any backend error: say which directory and why
        raise ValueError(f"workdir {workdir!r} cannot be created ({type(e).__name__}: {e}); check the bucket "
                         "name and credentials") from e


def scratch_dir(workdir: str | os.PathLike) -> str:
    """Where files regenerated from the config go: the workdir itself when local, else a local directory
    derived from the URL (the same one on every start of that run)."""
    workdir = os.fspath(workdir)
    if not is_remote(workdir):
        return workdir
    root = os.environ.get("MGRPO_SCRATCH") or os.path.join(os.path.expanduser("~"), ".cache", "mgrpo_jax", "runs")
    path = os.path.join(root, hashlib.sha256(workdir.encode()).hexdigest()[:16])
    os.makedirs(path, exist_ok=True)
    return path


class Mirror:
    """A local directory whose files are copied to `remote` (an epath.Path) on `sync()`; `restore()` first
    fetches what the remote already has (a resumed run keeps appending to its metrics)."""

    def __init__(self, local_dir: str, remote: epath.Path):
        self.local_dir, self.remote = local_dir, remote
        os.makedirs(local_dir, exist_ok=True)

    def restore(self, names: list[str]) -> None:
        for name in names:
            source = self.remote / name
            if source.exists():
                with open(os.path.join(self.local_dir, name), "wb") as f:
                    f.write(source.read_bytes())

    def sync(self) -> None:
        for root, _, files in os.walk(self.local_dir):
            for name in files:
                path = os.path.join(root, name)
                target = self.remote / os.path.relpath(path, self.local_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "rb") as f:
                    target.write_bytes(f.read())
