"""The answers serialized once are byte for byte what protobuf would send for every decision,
with and without the key's identity, unary and streamed; a result's bytes follow its value, not
an object that happened to be at the same address before."""

from __future__ import annotations

import gc

import pytest

from keyguard import AuthorizeResult, Decision, Permission
from keyguard.v1 import keyguard_pb2 as pb
from keyguard_server import _answers as answers
from keyguard_server._answers import SerializedOnce, response

RESULTS = [AuthorizeResult(decision is Decision.ALLOW, decision) for decision in Decision] + [
    AuthorizeResult(decision is Decision.ALLOW, decision, "acct", "bot", level)
    for decision in Decision
    for level in Permission
]


@pytest.mark.parametrize("result", RESULTS, ids=lambda r: f"{r.decision.name}-{r.permission}")
def test_answers_are_protobufs_own_bytes(result: AuthorizeResult) -> None:
    message = pb.AuthorizeResponse(
        allowed=result.allowed,
        decision=int(result.decision),  # type: ignore[arg-type]  # the wire number, as a client sees it
        account_id=result.account_id,
        key_name=result.key_name,
        permission=int(result.permission or 0),  # type: ignore[arg-type]
    )
    for _ in range(2):  # built, then kept
        assert answers.unary(result) == message.SerializeToString()
        for message_id in (0, 1, 2**64 - 1):
            whole = pb.AuthorizeStreamResponse(id=message_id, response=message)
            assert answers.streamed(message_id, result) == whole.SerializeToString()


def test_an_answer_follows_its_result_not_its_address() -> None:
    once: SerializedOnce[None] = SerializedOnce(lambda result, _: response(result).SerializeToString(), max_entries=2)
    for decision in (Decision.ALLOW, Decision.BAD_SECRET, Decision.KEY_EXPIRED, Decision.ALLOW):
        result = AuthorizeResult(decision is Decision.ALLOW, decision, "acct", "bot", Permission.READ)
        assert once(result, None) == response(result).SerializeToString()
        del result
        gc.collect()  # a new result may well get a freed one's address
