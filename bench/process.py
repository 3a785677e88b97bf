"""Child processes (perf_analyzer, bench) that end cleanly: SIGTERM first, so they can remove their
shared-memory regions, SIGKILL only if they do not stop."""

from __future__ import annotations

import subprocess
from typing import Any


def run_child(argv: list[str], timeout: float, **popen: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True, timeout=...)``, but a timeout or an
    interrupt of ours terminates the child before killing it. Raises ``subprocess.TimeoutExpired``."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
