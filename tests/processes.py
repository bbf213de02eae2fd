"""Launching the processes of a multi-controller CPU test (gloo collectives on 127.0.0.1)."""
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(script, args, tmp_path, *, count: int = 2, timeout_s: float = 120.0) -> list[tuple[int, str]]:
    """Runs `count` processes of `script args...` as one jax.distributed job (MGRPO_* variables) and waits.

    Returns (exit status, the log's last 4000 characters) per process; a process still running after
    `timeout_s` is killed (negative status). Logs go to files, not pipes: a full pipe would block a worker.
    """
    port = free_port()
    procs, logs = [], []
    for pid in range(count):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        env.update(MGRPO_COORDINATOR=f"127.0.0.1:{port}", MGRPO_NUM_PROCESSES=str(count), MGRPO_PROCESS_ID=str(pid))
        log = open(tmp_path / f"log_{pid}.txt", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    return [(proc.returncode, (tmp_path / f"log_{pid}.txt").read_text()[-4000:]) for pid, proc in enumerate(procs)]
