"""The Python enums are the proto's enums, name for name and number for number.

``keyguard.Permission`` & co. are written by hand (readable names, docstrings, ``Permission.parse``)
while the wire speaks the generated enums, and both sides convert with ``Permission(n)``. This
derives the expected members from the generated descriptors, so adding, renumbering or renaming a
value in keyguard.proto without the same change in ``keyguard._models`` fails here.
"""

from __future__ import annotations

import enum

import pytest
from google.protobuf.descriptor import EnumDescriptor

from keyguard import AuditAction, Decision, KeyType, Permission
from keyguard.v1 import keyguard_pb2

PYTHON_ENUMS: dict[str, type[enum.IntEnum]] = {
    "Permission": Permission,
    "KeyType": KeyType,
    "AuditAction": AuditAction,
    "Decision": Decision,
}


def _proto_members(descriptor: EnumDescriptor) -> dict[str, int]:
    """The proto enum's values without its type prefix (PERMISSION_READ -> READ) and without the
    zero value, which only means "not set" on the wire (UNSPECIFIED) and has no Python member."""
    prefix = descriptor.values[0].name.removesuffix("UNSPECIFIED")
    assert descriptor.values[0].number == 0 and descriptor.values[0].name == f"{prefix}UNSPECIFIED"
    return {value.name.removeprefix(prefix): value.number for value in descriptor.values[1:]}


def test_every_proto_enum_has_a_python_twin() -> None:
    assert set(keyguard_pb2.DESCRIPTOR.enum_types_by_name) == set(PYTHON_ENUMS)


@pytest.mark.parametrize("name", sorted(PYTHON_ENUMS))
def test_python_enum_matches_the_proto(name: str) -> None:
    expected = _proto_members(keyguard_pb2.DESCRIPTOR.enum_types_by_name[name])
    actual = {member.name: member.value for member in PYTHON_ENUMS[name]}
    assert actual == expected
