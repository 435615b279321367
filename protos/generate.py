"""Generates the Python stubs (+ .pyi) for every .proto here, and the descriptor set of the
keyguard.v1 API that Envoy's gRPC-JSON transcoder reads (`make proto`: client/ and
protos/keyguard.binpb).

One definition of the protoc invocations, used by `make proto`, by `make lint` (an image for
`buf lint`, `--lint-image`) and by the test that fails when the committed output is stale.
Needs grpcio-tools and mypy-protobuf (protoc-gen-mypy on PATH). google/rpc/*.proto and
google/api/*.proto (the HTTP rules) come from the installed googleapis-common-protos, whose
Python modules the generated code imports at run time: nothing is copied or fetched.
"""

from __future__ import annotations

import sys
from pathlib import Path

import google.rpc
from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
API = "keyguard/v1/keyguard.proto"


def _includes() -> list[str]:
    googleapis = Path(google.rpc.__path__[0]).parents[1]
    return [f"-I{HERE}", f"-I{googleapis}", f"-I{Path(protoc.__file__).parent / '_proto'}"]


def _protos() -> list[str]:
    return sorted(str(p.relative_to(HERE)) for p in HERE.rglob("*.proto"))


def generate(out_dir: str, descriptor_set: str) -> int:
    stubs = protoc.main(
        [
            "grpc_tools.protoc",
            *_includes(),
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            *_protos(),
        ]
    )
    # What Envoy's grpc_json_transcoder needs: the API, its HTTP rules, every import, and the
    # error details keyguard sends (a BadRequest in grpc-status-details-bin becomes JSON).
    return stubs or protoc.main(
        [
            "grpc_tools.protoc",
            *_includes(),
            "--include_imports",
            f"--descriptor_set_out={descriptor_set}",
            API,
            "google/rpc/status.proto",
            "google/rpc/error_details.proto",
        ]
    )


def lint_image(path: str) -> int:
    """Every proto here with its imports and source info: `buf lint` reads it as an image, so buf
    needs neither the network nor a copy of googleapis to resolve google/api/annotations.proto."""
    return protoc.main(
        [
            "grpc_tools.protoc",
            *_includes(),
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={path}",
            *_protos(),
        ]
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--lint-image":
        sys.exit(lint_image(sys.argv[2]))
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} OUT_DIR DESCRIPTOR_SET | --lint-image IMAGE")
    sys.exit(generate(sys.argv[1], sys.argv[2]))
