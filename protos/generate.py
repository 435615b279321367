"""Generates the Python stubs (+ .pyi) for every .proto here, and the descriptor set of the
keyguard.v1 API that Envoy's gRPC-JSON transcoder reads (`make proto`: client/, server/ and
protos/keyguard.binpb).

Each generated module's import path follows its .proto file's path, and each belongs to one
distribution: keyguard/v1/*.proto (the API) become `keyguard.v1` in the client (client/),
keyguard_server/envoy/**.proto (Envoy's ext_authz, which only the server implements) become
`keyguard_server.envoy` in the server (server/).

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
# The top folder under protos/ of each distribution's protos, and the folder its stubs go to.
CLIENT_PROTOS = "keyguard"
SERVER_PROTOS = "keyguard_server"


def _includes(root: Path = HERE) -> list[str]:
    googleapis = Path(google.rpc.__path__[0]).parents[1]
    return [f"-I{root}", f"-I{googleapis}", f"-I{Path(protoc.__file__).parent / '_proto'}"]


def _protos(top: str = "", root: Path = HERE) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / top).rglob("*.proto"))


def _stubs(out_dir: str, protos: list[str]) -> int:
    return protoc.main(
        [
            "grpc_tools.protoc",
            *_includes(),
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            *protos,
        ]
    )


def generate(client_dir: str, server_dir: str, descriptor_set: str) -> int:
    stubs = _stubs(client_dir, _protos(CLIENT_PROTOS)) or _stubs(server_dir, _protos(SERVER_PROTOS))
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


def lint_image(path: str, root: Path = HERE) -> int:
    """Every proto under ``root`` (here, or an earlier commit's protos/ for `buf breaking`) with
    its imports and source info: buf reads it as an image, so buf needs neither the network nor a
    copy of googleapis to resolve google/api/annotations.proto."""
    return protoc.main(
        [
            "grpc_tools.protoc",
            *_includes(root),
            "--include_imports",
            "--include_source_info",
            f"--descriptor_set_out={path}",
            *_protos(root=root),
        ]
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--lint-image":
        sys.exit(lint_image(sys.argv[2]))
    if len(sys.argv) != 4:
        sys.exit(f"usage: {sys.argv[0]} CLIENT_DIR SERVER_DIR DESCRIPTOR_SET | --lint-image IMAGE")
    sys.exit(generate(sys.argv[1], sys.argv[2], sys.argv[3]))
