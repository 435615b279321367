"""The committed generated code is exactly what `make proto` produces now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    assert shutil.which("protoc-gen-mypy", path=str(Path(sys.executable).parent)), "mypy-protobuf missing"
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    env_path = f"{Path(sys.executable).parent}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'protos'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--mypy_out={tmp_path}",
            f"--mypy_grpc_out={tmp_path}",
            *protos,
        ],
        check=True,
        capture_output=True,
        env={"PATH": env_path},
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT / "client")
        for p in (ROOT / "client" / "keyguard").rglob("*_pb2*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert generated == committed, "run `make proto`"
    for path in generated:
        assert (tmp_path / path).read_text() == (ROOT / "client" / path).read_text(), (
            f"{path} is stale: run `make proto`"
        )
