"""The full names of the gRPC services keyguard serves, derived once from the generated
descriptors, so a renamed service or package in a .proto changes every use at once: who may call
what (``_callers``), health, reflection and the registration of servicers (``_routing``).
"""

from __future__ import annotations

from grpc_health.v1 import health

from keyguard.v1 import keyguard_pb2 as pb
from keyguard_server._reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2 as ext

KEY_MANAGEMENT: str = pb.DESCRIPTOR.services_by_name["KeyManagement"].full_name
AUTHORIZATION: str = pb.DESCRIPTOR.services_by_name["Authorization"].full_name
# Every service of the keyguard.v1 API, in the proto's order.
KEYGUARD_SERVICES: tuple[str, ...] = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())
# Envoy's ext_authz Check: another name for Authorization.
ENVOY_AUTHORIZATION: str = ext.DESCRIPTOR.services_by_name["Authorization"].full_name
HEALTH: str = health.SERVICE_NAME
# A health name of its own, no gRPC service: NOT_SERVING while writes cannot land (a full disk)
# though the database answers, so reads and Authorize stay SERVING under "" and their services.
WRITES_HEALTH = "keyguard.writes"
# Open to every caller, authenticated or not: they reveal nothing about keys or accounts.
OPEN_SERVICES = frozenset({HEALTH, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME})
