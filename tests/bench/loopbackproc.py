"""A loopback server in its own process, for the benchmarks (its CPU is not the bench's GIL's).

The server module is started as ``python -m tests.loopback.<product> ...`` with this process's TLS
trust, prints ``READY <url> [more words]`` once it listens, and stops when its standard input
closes (or is killed with its process group after 10 s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tests.loopback.tls import shared_tls_environment

ROOT = Path(__file__).resolve().parents[2]


class LoopbackProcess:
    def __init__(
        self, module: str, args: list[str], *, name: str, error: type[Exception] = RuntimeError
    ) -> None:
        self.module = module
        self.args = args
        self.name = name
        self.error = error
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def launch(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            cwd=ROOT,
            env={**os.environ, **shared_tls_environment()},
            stdin=subprocess.PIPE,  # closing it stops the server
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group: stop() can end it whatever it started
        )

    def ready(self, words: int, timeout: float = 180.0) -> list[str]:
        """The words of the server's READY line (``words`` of them, READY included); sets ``url``."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            raise self.error(f"the loopback {self.name} was not started")
        stdout = proc.stdout
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = lines[0].split() if lines else []
        if len(line) != words or line[0] != "READY":
            raise self.error(f"the loopback {self.name} did not start: {line or 'timeout'}")
        self.url = line[1]
        return line

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if proc.stdin is not None:
                proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
