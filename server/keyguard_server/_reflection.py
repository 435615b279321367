"""Server reflection, as ``grpc.reflection.v1`` (what grpcurl and ``buf curl`` try first) and v1alpha.

grpcio-reflection ships only v1alpha (grpc/grpc#38576). The v1 protocol is the
same file under another package: every message and field number is identical.
So v1 is served by grpcio-reflection's own servicer under the v1 method name,
and the v1 file (derived from v1alpha's descriptor, with the package renamed)
is added to the descriptor pool, so a client can also describe the v1 service.
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME: str = reflection.SERVICE_NAME
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_file(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    file.name, file.package = V1_FILE, "grpc.reflection.v1"
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(old, new)
    for method in file.service[0].method:
        method.input_type = method.input_type.replace(old, new)
        method.output_type = method.output_type.replace(old, new)
    file.options.java_package = "io.grpc.reflection.v1"
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    pool.AddSerializedFile(file.SerializeToString())


class Registrar(Protocol):
    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None: ...


def enable_server_reflection(service_names: tuple[str, ...], server: Registrar) -> None:
    """Reflection v1 and v1alpha on ``server``, listing ``service_names`` and both reflection services."""
    _add_v1_file(descriptor_pool.Default())
    servicer: Any = reflection.aio.ReflectionServicer((*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME))
    for name in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_registered_method_handlers(name, {"ServerReflectionInfo": handler})
