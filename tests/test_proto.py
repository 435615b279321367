"""The committed generated code, and Envoy's descriptor set, are exactly what `make proto` produces now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    bin_dir = str(Path(sys.executable).parent)  # protoc-gen-mypy lives beside python
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), str(tmp_path), str(tmp_path / "keyguard.binpb")],
        check=True,
        capture_output=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"},
    )
    descriptor_set = (tmp_path / "keyguard.binpb").read_bytes()
    (tmp_path / "keyguard.binpb").unlink()
    assert descriptor_set == (ROOT / "protos" / "keyguard.binpb").read_bytes(), (
        "protos/keyguard.binpb (Envoy's transcoder descriptor set) is stale: run `make proto`"
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(
        p.relative_to(ROOT / "client")
        for p in (ROOT / "client" / "keyguard").rglob("*_pb2*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert generated, "protoc generated nothing"
    assert generated == committed, "run `make proto`"
    for path in generated:
        assert (tmp_path / path).read_text() == (ROOT / "client" / path).read_text(), (
            f"{path} is stale: run `make proto`"
        )
