"""The gRPC face of the domain: thin servicers and the one error mapping.

Servicers unpack the request, call the domain, pack the answer. Domain errors
become gRPC statuses in :func:`maps_errors`, the only place that knows how;
INVALID_ARGUMENT carries a ``google.rpc.BadRequest`` naming each field.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from keyguard import (
    AccountSettings,
    ApiKey,
    AuditEvent,
    AuthorizeResult,
    FieldViolation,
    InvalidArgument,
    KeyguardError,
    SignedRequest,
    StorageFull,
    WithdrawalAddress,
    WithdrawalDestination,
)
from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from keyguard_server import _answers as answers
from keyguard_server._callers import current_caller
from keyguard_server._keys import KeyManager
from keyguard_server._stream import StreamDecider
from keyguard_server.authorize._authorizer import Authorizer
from keyguard_server.authorize._domain import Query

log = logging.getLogger("keyguard.grpc")

# StorageFull's retry hint (google.rpc.RetryInfo): a full disk is not freed at once.
STORAGE_FULL_RETRY_SECONDS = 30

Req = TypeVar("Req")
Resp = TypeVar("Resp")
S = TypeVar("S")
Handler = Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def error_status(exc: KeyguardError) -> grpc.Status:
    return rpc_status.to_status(status_message(exc))


def status_message(exc: KeyguardError) -> status_pb2.Status:
    """The google.rpc.Status an error travels as (in a call's trailers, or in a stream's answer)."""
    details = []
    if isinstance(exc, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in exc.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        details.append(detail)
    elif isinstance(exc, StorageFull):  # retry later: what tells it apart from LimitExceeded
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=STORAGE_FULL_RETRY_SECONDS)))
        details.append(detail)
    code: int = exc.code.value[0]
    return status_pb2.Status(code=code, message=exc.message, details=details)


def maps_errors(handler: Handler[S, Req, Resp]) -> Handler[S, Req, Resp]:
    """Every servicer method's one error mapping: keyguard errors become their status, anything
    else INTERNAL with the traceback in the log only (no exception text reaches a caller)."""

    @functools.wraps(handler)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await handler(self, request, context)
        except KeyguardError as exc:
            await context.abort_with_status(error_status(exc))
        except Exception:
            # The traceback goes to the log; the caller learns nothing internal.
            log.exception("unexpected error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("abort returned")  # pragma: no cover

    return wrapper


def _timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts


def _moment(message: Message, field: str) -> datetime | None:
    """A Timestamp field as an aware datetime, None when unset."""
    if not message.HasField(field):
        return None
    timestamp: timestamp_pb2.Timestamp = getattr(message, field)
    try:
        return timestamp.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument([FieldViolation(field, "is not a valid timestamp")]) from None


def _key(key: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(
        account_id=key.account_id,
        access_key=key.access_key,
        name=key.name,
        permission=pb.Permission.ValueType(key.permission),
        allowed_ips=key.allowed_ips,
        created_at=_timestamp(key.created_at),
        last_used_at=_timestamp(key.last_used_at) if key.last_used_at else None,
        last_used_ip=key.last_used_ip,
        expires_at=_timestamp(key.expires_at) if key.expires_at else None,
        enabled=key.enabled,
        previous_key_valid_until=_timestamp(key.previous_key_valid_until) if key.previous_key_valid_until else None,
        key_type=pb.KeyType.ValueType(key.key_type),
        public_key=key.public_key,
        symbols=key.symbols,
        unrestricted_until=_timestamp(key.unrestricted_until) if key.unrestricted_until else None,
    )


def _settings(settings: AccountSettings) -> pb.AccountSettings:
    return pb.AccountSettings(
        account_id=settings.account_id,
        address_management=settings.address_management,
        key_count=settings.key_count,
        max_keys=settings.max_keys,
        frozen=settings.frozen,
        address_management_off_at=(
            _timestamp(settings.address_management_off_at) if settings.address_management_off_at else None
        ),
    )


def _address(entry: WithdrawalAddress) -> pb.WithdrawalAddress:
    return pb.WithdrawalAddress(
        id=entry.id,
        asset=entry.asset,
        address=entry.address,
        memo=entry.memo,
        label=entry.label,
        created_at=_timestamp(entry.created_at),
        usable_from=_timestamp(entry.usable_from) if entry.usable_from else None,
    )


def _event(event: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        id=event.id,
        time=_timestamp(event.time),
        caller=event.caller,
        action=pb.AuditAction.ValueType(event.action),
        account_id=event.account_id,
        access_key=event.access_key,
        details=event.details,
    )


Context = grpc.aio.ServicerContext


class KeyManagementServicer(pb_grpc.KeyManagementServicer):
    def __init__(self, manager: KeyManager) -> None:
        self._manager = manager

    @maps_errors
    async def CreateKey(
        self, request: pb.CreateKeyRequest, context: Context[pb.CreateKeyRequest, pb.CreateKeyResponse]
    ) -> pb.CreateKeyResponse:
        created = await self._manager.create_key(
            current_caller(),
            request.account_id,
            request.name,
            request.permission,
            list(request.allowed_ips),
            _moment(request, "expires_at"),
            request.key_type,
            request.public_key,
            list(request.symbols),
        )
        return pb.CreateKeyResponse(key=_key(created.key), private_key=created.private_key)

    @maps_errors
    async def ListKeys(
        self, request: pb.ListKeysRequest, context: Context[pb.ListKeysRequest, pb.ListKeysResponse]
    ) -> pb.ListKeysResponse:
        return pb.ListKeysResponse(keys=[_key(k) for k in await self._manager.list_keys(request.account_id)])

    @maps_errors
    async def GetKey(
        self, request: pb.GetKeyRequest, context: Context[pb.GetKeyRequest, pb.GetKeyResponse]
    ) -> pb.GetKeyResponse:
        return pb.GetKeyResponse(key=_key(await self._manager.get_key(request.account_id, request.access_key)))

    @maps_errors
    async def DeleteKey(
        self, request: pb.DeleteKeyRequest, context: Context[pb.DeleteKeyRequest, pb.DeleteKeyResponse]
    ) -> pb.DeleteKeyResponse:
        await self._manager.delete_key(current_caller(), request.account_id, request.access_key)
        return pb.DeleteKeyResponse()

    @maps_errors
    async def UpdateKey(
        self, request: pb.UpdateKeyRequest, context: Context[pb.UpdateKeyRequest, pb.UpdateKeyResponse]
    ) -> pb.UpdateKeyResponse:
        key = await self._manager.update_key(
            current_caller(),
            request.account_id,
            request.access_key,
            name=request.name if request.HasField("name") else None,
            permission=request.permission if request.HasField("permission") else None,
            allowed_ips=list(request.allowed_ips.entries) if request.HasField("allowed_ips") else None,
            expires_at=_moment(request, "expires_at"),
            clear_expires_at=request.clear_expires_at,
            enabled=request.enabled if request.HasField("enabled") else None,
            symbols=list(request.symbols.entries) if request.HasField("symbols") else None,
        )
        return pb.UpdateKeyResponse(key=_key(key))

    @maps_errors
    async def RotateKey(
        self, request: pb.RotateKeyRequest, context: Context[pb.RotateKeyRequest, pb.RotateKeyResponse]
    ) -> pb.RotateKeyResponse:
        grace = request.grace_seconds if request.HasField("grace_seconds") else None
        created = await self._manager.rotate_key(
            current_caller(), request.account_id, request.access_key, grace, request.public_key
        )
        return pb.RotateKeyResponse(key=_key(created.key), private_key=created.private_key)

    @maps_errors
    async def DeleteAllKeys(
        self,
        request: pb.DeleteAllKeysRequest,
        context: Context[pb.DeleteAllKeysRequest, pb.DeleteAllKeysResponse],
    ) -> pb.DeleteAllKeysResponse:
        return pb.DeleteAllKeysResponse(
            deleted_count=await self._manager.delete_all_keys(current_caller(), request.account_id)
        )

    @maps_errors
    async def GetAccountSettings(
        self,
        request: pb.GetAccountSettingsRequest,
        context: Context[pb.GetAccountSettingsRequest, pb.GetAccountSettingsResponse],
    ) -> pb.GetAccountSettingsResponse:
        settings = await self._manager.account_settings(request.account_id)
        return pb.GetAccountSettingsResponse(settings=_settings(settings))

    @maps_errors
    async def SetAddressManagement(
        self,
        request: pb.SetAddressManagementRequest,
        context: Context[pb.SetAddressManagementRequest, pb.SetAddressManagementResponse],
    ) -> pb.SetAddressManagementResponse:
        settings = await self._manager.set_address_management(current_caller(), request.account_id, request.enabled)
        return pb.SetAddressManagementResponse(settings=_settings(settings))

    @maps_errors
    async def AddWithdrawalAddress(
        self,
        request: pb.AddWithdrawalAddressRequest,
        context: Context[pb.AddWithdrawalAddressRequest, pb.AddWithdrawalAddressResponse],
    ) -> pb.AddWithdrawalAddressResponse:
        entry = await self._manager.add_address(
            current_caller(), request.account_id, request.asset, request.address, request.memo, request.label
        )
        return pb.AddWithdrawalAddressResponse(address=_address(entry))

    @maps_errors
    async def ListWithdrawalAddresses(
        self,
        request: pb.ListWithdrawalAddressesRequest,
        context: Context[pb.ListWithdrawalAddressesRequest, pb.ListWithdrawalAddressesResponse],
    ) -> pb.ListWithdrawalAddressesResponse:
        entries = await self._manager.list_addresses(request.account_id)
        return pb.ListWithdrawalAddressesResponse(addresses=[_address(e) for e in entries])

    @maps_errors
    async def RemoveWithdrawalAddress(
        self,
        request: pb.RemoveWithdrawalAddressRequest,
        context: Context[pb.RemoveWithdrawalAddressRequest, pb.RemoveWithdrawalAddressResponse],
    ) -> pb.RemoveWithdrawalAddressResponse:
        await self._manager.remove_address(current_caller(), request.account_id, request.address_id)
        return pb.RemoveWithdrawalAddressResponse()

    @maps_errors
    async def ListAuditEvents(
        self,
        request: pb.ListAuditEventsRequest,
        context: Context[pb.ListAuditEventsRequest, pb.ListAuditEventsResponse],
    ) -> pb.ListAuditEventsResponse:
        events, next_token = await self._manager.audit_events(request.account_id, request.page_size, request.page_token)
        return pb.ListAuditEventsResponse(events=[_event(e) for e in events], next_page_token=next_token)

    @maps_errors
    async def FreezeAccount(
        self,
        request: pb.FreezeAccountRequest,
        context: Context[pb.FreezeAccountRequest, pb.FreezeAccountResponse],
    ) -> pb.FreezeAccountResponse:
        settings = await self._manager.set_frozen(current_caller(), request.account_id, True, request.reason)
        return pb.FreezeAccountResponse(settings=_settings(settings))

    @maps_errors
    async def UnfreezeAccount(
        self,
        request: pb.UnfreezeAccountRequest,
        context: Context[pb.UnfreezeAccountRequest, pb.UnfreezeAccountResponse],
    ) -> pb.UnfreezeAccountResponse:
        settings = await self._manager.set_frozen(current_caller(), request.account_id, False, request.reason)
        return pb.UnfreezeAccountResponse(settings=_settings(settings))


AUTHORIZE_STREAM = "/keyguard.v1.Authorization/AuthorizeStream"


class AuthorizationServicer:
    """Answers bytes (see _answers), not the generated base class's messages: registered by _routing."""

    def __init__(self, authorizer: Authorizer, stream_max_in_flight: int = 64) -> None:
        self._authorizer = authorizer
        self._streams = StreamDecider(stream_max_in_flight, AUTHORIZE_STREAM)

    def end_streams(self) -> None:
        """Shutdown: streams stop reading, answer what they read and end (UNAVAILABLE)."""
        self._streams.stop()

    @maps_errors
    async def Authorize(self, request: pb.AuthorizeRequest, context: Context[pb.AuthorizeRequest, bytes]) -> bytes:
        decided = self._authorizer.decide(_query(request, context.time_remaining()))
        if not isinstance(decided, AuthorizeResult):
            decided = await decided
        return answers.unary(decided)

    async def AuthorizeStream(
        self,
        request_iterator: AsyncIterator[pb.AuthorizeStreamRequest],
        context: Context[pb.AuthorizeStreamRequest, bytes],
    ) -> None:
        """Authorize per message (see _stream); each error is an answer, as maps_errors maps it.
        Messages are read and answers written on ``context`` (grpc's reader-writer form: the
        iterator is not used), answers serialized, not yielded."""

        def answer(message: pb.AuthorizeStreamRequest) -> bytes | Coroutine[Any, Any, bytes]:
            time_left = context.time_remaining()
            if message.timeout_ms:  # the message's own deadline, within the stream's
                limit = message.timeout_ms / 1000
                time_left = limit if time_left is None else min(limit, time_left)
            try:
                decided = self._authorizer.decide(_query(message.request, time_left))
            except Exception as exc:
                return _stream_error(message.id, exc)
            if isinstance(decided, AuthorizeResult):
                return answers.streamed(message.id, decided)
            return _answer_later(message.id, decided)

        await self._streams.serve(context, answer)


async def _answer_later(message_id: int, decided: Coroutine[Any, Any, AuthorizeResult]) -> bytes:
    try:
        result = await decided
    except Exception as exc:
        return _stream_error(message_id, exc)
    return answers.streamed(message_id, result)


def _query(request: pb.AuthorizeRequest, time_left: float | None) -> Query:
    """The domain's question for an AuthorizeRequest."""
    destination = None
    if request.HasField("destination"):
        d = request.destination
        destination = WithdrawalDestination(d.asset, d.address, d.memo)
    signed = None
    if request.HasField("signed"):
        r = request.signed
        signed = SignedRequest(r.payload, r.timestamp_ms, r.nonce, r.signature)
    return Query(
        request.access_key,
        request.private_key,
        request.client_ip,
        request.required_permission,
        destination,
        signed,
        request.symbol,
        time_left,
    )


def _stream_error(message_id: int, exc: Exception) -> bytes:
    """A stream message's error answer (serialized), mapped as :func:`maps_errors` maps a unary call's."""
    if isinstance(exc, KeyguardError):
        status = status_message(exc)
        error = pb.RpcStatus(code=status.code, message=status.message, details=status.details)
    else:
        log.exception("unexpected error in AuthorizeStream", exc_info=exc)
        error = pb.RpcStatus(code=grpc.StatusCode.INTERNAL.value[0], message="internal error")
    return pb.AuthorizeStreamResponse(id=message_id, error=error).SerializeToString()
