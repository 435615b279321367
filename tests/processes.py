"""`keyguard-server serve` and the `keyguard` CLI as separate processes, as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from keyguard import Client

KEYGUARD = str(Path(sys.executable).parent / "keyguard")  # the client distribution's admin CLI
KEYGUARD_SERVER = str(Path(sys.executable).parent / "keyguard-server")  # the server distribution's command
FAST_ARGON2_ENV = {
    "KEYGUARD_ARGON2_TIME_COST": "1",
    "KEYGUARD_ARGON2_MEMORY_KIB": "1024",
    "KEYGUARD_ARGON2_PARALLELISM": "1",
}


class ServeProcess:
    """`keyguard-server serve --listen 127.0.0.1:0` in ``cwd``; its port is read from its log."""

    def __init__(self, cwd: Path, *args: str, log_name: str = "serve.log", env: dict[str, str] | None = None) -> None:
        self.cwd = cwd
        self.log = cwd / log_name
        self._log_file = self.log.open("w")
        self.proc = subprocess.Popen(
            [KEYGUARD_SERVER, "serve", "--listen", "127.0.0.1:0", *args],
            cwd=cwd,
            env={**os.environ, **FAST_ARGON2_ENV, **(env or {})},
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while not (match := re.search(r"\(port (\d+)", self.log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"server did not start:\n{self.log.read_text()}")
            time.sleep(0.05)
        self.target = f"127.0.0.1:{match[1]}"

    def client(self) -> Client:
        token = (self.cwd / "data" / "admin.token").read_text().strip()
        return Client(self.target, token=token, timeout=10)

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [KEYGUARD, "--target", self.target, *args],
            capture_output=True,
            text=True,
            input=stdin,
            timeout=30,
            cwd=self.cwd,  # where `keyguard-server serve` left data/admin.token, as for a user
        )

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self, timeout: float = 15) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(15)
        self._log_file.close()
