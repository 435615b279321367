"""Authorize's answers serialized once, not once per call: the wire bytes of a decision are kept
by the identity of its result, and sent as they are (the handler has no response serializer).

Why identity is safe: the common results are built once (the refusals before the credential
once per process, a key's ALLOW and its refusals once per row value, ``KeyRow``), and an entry
keeps its result alive, so while the entry lives no other object can have that id. A result
that is equal but another object only costs one more serialization. Bounded: all entries are
dropped when full. ``tests/unit/test_answers.py`` holds the bytes to ``SerializeToString()``
for every decision.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from keyguard import AuthorizeResult
from keyguard.v1 import keyguard_pb2 as pb

K = TypeVar("K")
MAX_ANSWERS = 4096


class SerializedOnce(Generic[K]):
    """``build(result, extra)``'s bytes, built once per (result object, ``extra``)."""

    def __init__(self, build: Callable[[AuthorizeResult, K], bytes], max_entries: int = MAX_ANSWERS) -> None:
        self._build = build
        self._max = max_entries
        self._known: dict[tuple[int, K], tuple[AuthorizeResult, bytes]] = {}

    def __call__(self, result: AuthorizeResult, extra: K) -> bytes:
        known = self._known.get((id(result), extra))
        if known is not None and known[0] is result:
            return known[1]
        answer = self._build(result, extra)
        if len(self._known) >= self._max:
            self._known.clear()
        self._known[id(result), extra] = (result, answer)
        return answer


def response(result: AuthorizeResult) -> pb.AuthorizeResponse:
    """The wire message of a decision."""
    return pb.AuthorizeResponse(
        allowed=result.allowed,
        decision=pb.Decision.ValueType(result.decision),
        account_id=result.account_id,
        key_name=result.key_name,
        permission=pb.Permission.ValueType(result.permission or 0),
    )


_UNARY: SerializedOnce[None] = SerializedOnce(lambda result, _: response(result).SerializeToString())
# A stream's answer after its id: protobuf parses concatenated messages as one, merged, and
# serializes fields in number order (id = 1, response = 2), so id's bytes + these bytes are the
# message's own serialization.
_STREAMED: SerializedOnce[None] = SerializedOnce(
    lambda result, _: pb.AuthorizeStreamResponse(response=response(result)).SerializeToString()
)


def unary(result: AuthorizeResult) -> bytes:
    """An AuthorizeResponse, serialized."""
    return _UNARY(result, None)


def streamed(message_id: int, result: AuthorizeResult) -> bytes:
    """The AuthorizeStreamResponse for message ``message_id``, serialized."""
    return pb.AuthorizeStreamResponse(id=message_id).SerializeToString() + _STREAMED(result, None)
