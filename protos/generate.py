"""Generates the Python stubs (+ .pyi) for every .proto here into OUT_DIR (`make proto`: client/).

One definition of the protoc invocation, used by `make proto` and by the test
that fails when the committed stubs are stale. Needs grpcio-tools and
mypy-protobuf (protoc-gen-mypy on PATH); google/rpc/*.proto come from
googleapis-common-protos.
"""

from __future__ import annotations

import sys
from pathlib import Path

import google.rpc
from grpc_tools import protoc

HERE = Path(__file__).resolve().parent


def generate(out_dir: str) -> int:
    googleapis = Path(google.rpc.__path__[0]).parents[1]
    protos = sorted(str(p.relative_to(HERE)) for p in HERE.rglob("*.proto"))
    return protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"-I{googleapis}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            *protos,
        ]
    )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR")
    sys.exit(generate(sys.argv[1]))
