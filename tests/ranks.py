"""Run a script as two real torch.distributed ranks (gloo on 127.0.0.1, like ``torchrun`` on a CPU)
with a deadline, so that a rank that hangs fails the test instead of hanging the suite."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(work: Path, script: str, timeout_s: float) -> list[dict]:
    """Run ``script`` (argument: ``work``) as ranks 0 and 1; each must write ``work/result_<rank>.json``.

    Returns the two results ``[rank 0's, rank 1's]``; fails the test if a rank is still running
    after ``timeout_s`` (a hang) or exits with an error."""
    (work / "worker.py").write_text(script)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    logs = [work / f"log_{rank}.txt" for rank in range(2)]  # files, not pipes: a full pipe cannot block a rank
    procs = []
    for rank in range(2):
        with open(logs[rank], "w") as log:  # the child keeps its own copy of the descriptor
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(work / "worker.py"), str(work)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                )
            )
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    hung = [r for r, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    texts = [log.read_text()[-3000:] for log in logs]
    if hung:
        pytest.fail(f"rank(s) {hung} still running after {timeout_s} s (hang); output:\n" + "\n".join(texts))
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{texts[rank]}"
    return [json.loads((work / f"result_{r}.json").read_text()) for r in range(2)]
