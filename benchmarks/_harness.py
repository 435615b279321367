"""What the benchmark scripts share: starting `keyguard-server serve`, pinning, h2load, gRPC framing."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KEYGUARD_SERVER = str(Path(sys.executable).parent / "keyguard-server")


def ensure_h2load() -> str:
    path = shutil.which("h2load")
    if path:
        return path
    print("h2load not found: installing nghttp2-client", file=sys.stderr)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "nghttp2-client"], check=True)
    return shutil.which("h2load") or sys.exit("h2load still missing")


def pinned(cpu: int, command: list[str]) -> list[str]:
    """Runs the command on one core when taskset exists and there are two."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu), *command]
    return command


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message, as h2load sends a request body."""
    return struct.pack(">?I", False, len(message)) + message


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    """What every h2load row reports; scripts add their own CPU columns."""

    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int


class KeyguardProcess:
    """`keyguard-server serve` on a free loopback port in ``data_dir`` (one worker: pinned to core 0 unless
    ``pin`` is false); its port is read from its log, its admin token from the data dir."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        workers: int = 1,
        log_name: str = "serve.log",
        pin: bool = True,
        wrapper: tuple[str, ...] = (),
        start_timeout: float = 30,
    ) -> None:
        """``wrapper``: a command the server runs under (e.g. valgrind), which may need ``start_timeout``."""
        self.data_dir = data_dir
        self.workers = workers
        self.log_path = data_dir / log_name
        self.log = self.log_path.open("w")
        command = [*wrapper, KEYGUARD_SERVER, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), *args]
        command += ["--workers", str(workers)]
        self.proc = subprocess.Popen(
            pinned(0, command) if workers == 1 and pin else command, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + start_timeout
        text = ""
        while not (match := re.search(r"\(port (\d+)", text)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                sys.exit(f"keyguard did not start:\n{text}")
            time.sleep(0.1)
            text = self.log_path.read_text()
        self.port = int(match[1])
        self.target = f"127.0.0.1:{self.port}"
        self.token = (data_dir / "admin.token").read_text().strip()
        time.sleep(0.5 * workers)  # let every worker bind

    def stop(self, label: str = "") -> None:
        """SIGTERM (SIGKILL after 30 s); prints the warnings and errors its log holds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        odd = [line for line in self.log_path.read_text().splitlines() if re.search(r"WARNING|ERROR|Traceback", line)]
        if odd:
            print(f"  keyguard log{label}: {len(odd)} warning/error lines, e.g.:", file=sys.stderr)
            for line in odd[:5]:
                print(f"    {line}", file=sys.stderr)


def h2load_grpc(
    port: int,
    token: str,
    path: str,
    body_file: Path,
    log_file: Path,
    *,
    streams: int,
    requests: int | None = None,
    seconds: float | None = None,
) -> tuple[Measured, int]:
    """One h2load run of a unary gRPC call on core 1 (``body_file`` holds its framed request), for
    ``requests`` requests or ``seconds`` seconds (-D); the row (named after ``log_file``) and the
    number of requests done. ``streams`` concurrent streams, 4 per connection."""
    connections = max(1, streams // 4)
    command = [ensure_h2load(), "-c", str(connections), "-m", str(streams // connections), "-t", "1"]
    command += ["-n", str(requests)] if seconds is None else ["-D", f"{seconds:g}"]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers", "-H", f"authorization: Bearer {token}"]
    command += ["-d", str(body_file), f"--log-file={log_file}", f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(pinned(1, command), capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)[1])  # type: ignore[index]
    counts = re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed", out)
    done, failed = (int(n) for n in counts.groups())  # type: ignore[union-attr]
    latencies = sorted(int(line.split("\t")[2]) / 1000 for line in log_file.read_text().splitlines() if line)
    p50 = latencies[len(latencies) // 2] if latencies else float("nan")
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else float("nan")
    return Measured(log_file.stem, rps, p50, p99, failed), done
