"""The committed generated code, and Envoy's descriptor set, are exactly what `make proto` produces now:
`keyguard.v1` in the client (client/), Envoy's ext_authz stubs `keyguard_server.envoy` in the server
(server/)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each distribution's folder, and the one top-level package of its generated code there.
DISTRIBUTIONS = {"keyguard": "client", "keyguard_server": "server"}


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    for side in DISTRIBUTIONS.values():
        (tmp_path / side).mkdir()
    bin_dir = str(Path(sys.executable).parent)  # protoc-gen-mypy lives beside python
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "protos" / "generate.py"),
            str(tmp_path / "client"),
            str(tmp_path / "server"),
            str(tmp_path / "keyguard.binpb"),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"},
    )
    descriptor_set = (tmp_path / "keyguard.binpb").read_bytes()
    (tmp_path / "keyguard.binpb").unlink()
    assert descriptor_set == (ROOT / "protos" / "keyguard.binpb").read_bytes(), (
        "protos/keyguard.binpb (Envoy's transcoder descriptor set) is stale: run `make proto`"
    )
    for package, side in DISTRIBUTIONS.items():
        generated = sorted(p.relative_to(tmp_path / side) for p in (tmp_path / side).rglob("*") if p.is_file())
        committed = sorted(
            p.relative_to(ROOT / side)
            for p in (ROOT / side / package).rglob("*_pb2*")
            if p.is_file() and "__pycache__" not in p.parts
        )
        assert generated, f"protoc generated nothing for {side}/"
        assert generated == committed, "run `make proto`"
        for path in generated:
            assert (tmp_path / side / path).read_text() == (ROOT / side / path).read_text(), (
                f"{side}/{path} is stale: run `make proto`"
            )
