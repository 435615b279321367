"""A typed, synchronous client over the generated stubs."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from keyguard._errors import (
    ERRORS_BY_CODE,
    FieldViolation,
    InvalidArgument,
    KeyguardError,
    ServerError,
    StorageFull,
)
from keyguard._models import (
    AccountSettings,
    ApiKey,
    AuditAction,
    AuditEvent,
    AuthorizeResult,
    CreatedKey,
    Decision,
    KeyType,
    Permission,
    SignedRequest,
    WithdrawalAddress,
    WithdrawalDestination,
)
from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"

Resp = TypeVar("Resp")


class Client:
    """Talks to one keyguard server; every method raises :class:`keyguard.KeyguardError`.

    ``token`` is the caller's bearer token. For TLS pass ``root_certificates``
    (PEM of the CA that signed the server's certificate) and, for mTLS, the
    client's ``private_key`` and ``certificate_chain``. Use as a context
    manager, or call :meth:`close`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        timeout: float = 10.0,
    ) -> None:
        if root_certificates or certificate_chain:
            credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, credentials)
        else:
            self._channel = grpc.insecure_channel(target)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._keys = pb_grpc.KeyManagementStub(self._channel)
        self._auth = pb_grpc.AuthorizationStub(self._channel)
        self._authorizers: list[StreamingAuthorizer] = []

    def close(self) -> None:
        """Closes the authorizers made by :meth:`authorizer`, then the channel."""
        for authorizer in self._authorizers:
            authorizer.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _call(self, method: Callable[..., Resp], request: Any) -> Resp:
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise domain_error(exc) from None

    # -- keys -----------------------------------------------------------------

    def create_key(
        self,
        account_id: str,
        name: str,
        permission: Permission | str | int,
        allowed_ips: Iterable[str] = (),
        *,
        expires_at: datetime | None = None,
        key_type: KeyType = KeyType.SECRET,
        public_key: str = "",
        symbols: Iterable[str] = (),
    ) -> CreatedKey:
        """Returns the new key and its private key, which is never available again.

        ED25519 keys: pass your own ``public_key`` (PEM), or get a generated
        pair's private key (PEM) in the result. ``symbols``: the only trading
        symbols its TRADE requests may name (empty: any).
        """
        request = pb.CreateKeyRequest(
            account_id=account_id,
            name=name,
            permission=pb.Permission.ValueType(Permission.parse(permission)),
            allowed_ips=list(allowed_ips),
            key_type=pb.KeyType.ValueType(key_type),
            public_key=public_key,
            symbols=list(symbols),
        )
        if expires_at is not None:
            request.expires_at.FromDatetime(expires_at)
        response = self._call(self._keys.CreateKey, request)
        return CreatedKey(_key(response.key), response.private_key)

    def update_key(
        self,
        account_id: str,
        access_key: str,
        *,
        name: str | None = None,
        permission: Permission | str | int | None = None,
        allowed_ips: Iterable[str] | None = None,
        expires_at: datetime | None = None,
        clear_expires_at: bool = False,
        enabled: bool | None = None,
        symbols: Iterable[str] | None = None,
    ) -> ApiKey:
        """Changes only what is given; ``allowed_ips=[]`` means any IP, ``symbols=[]`` any symbol."""
        request = pb.UpdateKeyRequest(account_id=account_id, access_key=access_key, clear_expires_at=clear_expires_at)
        if name is not None:
            request.name = name
        if permission is not None:
            request.permission = pb.Permission.ValueType(Permission.parse(permission))
        if allowed_ips is not None:
            request.allowed_ips.CopyFrom(pb.IpList(entries=list(allowed_ips)))
        if expires_at is not None:
            request.expires_at.FromDatetime(expires_at)
        if enabled is not None:
            request.enabled = enabled
        if symbols is not None:
            request.symbols.CopyFrom(pb.SymbolList(entries=list(symbols)))
        return _key(self._call(self._keys.UpdateKey, request).key)

    def rotate_key(
        self, account_id: str, access_key: str, *, grace_seconds: int | None = None, public_key: str = ""
    ) -> CreatedKey:
        """A new private key for the same access key; the old one works ``grace_seconds`` more (default 24 h).

        ED25519 keys: a new pair is generated unless ``public_key`` (PEM) is given.
        """
        request = pb.RotateKeyRequest(account_id=account_id, access_key=access_key, public_key=public_key)
        if grace_seconds is not None:
            request.grace_seconds = grace_seconds
        response = self._call(self._keys.RotateKey, request)
        return CreatedKey(_key(response.key), response.private_key)

    def list_keys(self, account_id: str) -> list[ApiKey]:
        response = self._call(self._keys.ListKeys, pb.ListKeysRequest(account_id=account_id))
        return [_key(k) for k in response.keys]

    def get_key(self, account_id: str, access_key: str) -> ApiKey:
        response = self._call(self._keys.GetKey, pb.GetKeyRequest(account_id=account_id, access_key=access_key))
        return _key(response.key)

    def delete_key(self, account_id: str, access_key: str) -> None:
        self._call(self._keys.DeleteKey, pb.DeleteKeyRequest(account_id=account_id, access_key=access_key))

    def delete_all_keys(self, account_id: str) -> int:
        """Deletes every key of the account at once; returns how many there were."""
        response = self._call(self._keys.DeleteAllKeys, pb.DeleteAllKeysRequest(account_id=account_id))
        return response.deleted_count

    # -- account settings and whitelist ---------------------------------------

    def get_account_settings(self, account_id: str) -> AccountSettings:
        response = self._call(self._keys.GetAccountSettings, pb.GetAccountSettingsRequest(account_id=account_id))
        return _settings(response.settings)

    def set_address_management(self, account_id: str, enabled: bool) -> AccountSettings:
        """On takes effect at once; off only after the server's hold (then the result is still on,
        with ``address_management_off_at`` set). On again cancels a pending off."""
        response = self._call(
            self._keys.SetAddressManagement,
            pb.SetAddressManagementRequest(account_id=account_id, enabled=enabled),
        )
        return _settings(response.settings)

    def freeze_account(self, account_id: str, reason: str = "") -> AccountSettings:
        """Every key of the account is refused (ACCOUNT_FROZEN) until :meth:`unfreeze_account`;
        keys are kept. Needs an admin caller (else :class:`keyguard.PermissionDenied`)."""
        response = self._call(self._keys.FreezeAccount, pb.FreezeAccountRequest(account_id=account_id, reason=reason))
        return _settings(response.settings)

    def unfreeze_account(self, account_id: str, reason: str = "") -> AccountSettings:
        """Undoes :meth:`freeze_account`. Needs an admin caller."""
        response = self._call(
            self._keys.UnfreezeAccount, pb.UnfreezeAccountRequest(account_id=account_id, reason=reason)
        )
        return _settings(response.settings)

    def add_withdrawal_address(
        self, account_id: str, asset: str, address: str, *, memo: str = "", label: str = ""
    ) -> WithdrawalAddress:
        response = self._call(
            self._keys.AddWithdrawalAddress,
            pb.AddWithdrawalAddressRequest(account_id=account_id, asset=asset, address=address, memo=memo, label=label),
        )
        return _address(response.address)

    def list_withdrawal_addresses(self, account_id: str) -> list[WithdrawalAddress]:
        response = self._call(
            self._keys.ListWithdrawalAddresses, pb.ListWithdrawalAddressesRequest(account_id=account_id)
        )
        return [_address(a) for a in response.addresses]

    def remove_withdrawal_address(self, account_id: str, address_id: int) -> None:
        self._call(
            self._keys.RemoveWithdrawalAddress,
            pb.RemoveWithdrawalAddressRequest(account_id=account_id, address_id=address_id),
        )

    def list_audit_events(
        self, account_id: str = "", *, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[AuditEvent], str]:
        """One page, newest first, and the token of the next page ("" at the end)."""
        response = self._call(
            self._keys.ListAuditEvents,
            pb.ListAuditEventsRequest(account_id=account_id, page_size=page_size, page_token=page_token),
        )
        return [_event(e) for e in response.events], response.next_page_token

    # -- authorization --------------------------------------------------------

    def authorize(
        self,
        access_key: str,
        private_key: str,
        client_ip: str,
        required_permission: Permission | str | int,
        destination: WithdrawalDestination | None = None,
        signed: SignedRequest | None = None,
        *,
        symbol: str = "",
    ) -> AuthorizeResult:
        """A refusal is a result with ``allowed=False``, not an exception. ``symbol``: the
        trading symbol of a TRADE request, for keys restricted to symbols."""
        request = _authorize_request(
            access_key, private_key, client_ip, required_permission, destination, signed, symbol
        )
        return _authorize_result(self._call(self._auth.Authorize, request))

    def authorizer(self, streams: int = 2) -> StreamingAuthorizer:
        """:meth:`authorize` for high-rate callers, over ``streams`` long-lived AuthorizeStream streams
        shared by every thread (see :class:`StreamingAuthorizer`); closed with this client."""
        authorizer = StreamingAuthorizer(self._auth, self._metadata, self._timeout, streams)
        self._authorizers.append(authorizer)
        return authorizer


class StreamingAuthorizer:
    """``authorize`` for gateways and other high-rate callers: concurrent calls from any number of
    threads share a few long-lived ``AuthorizeStream`` streams instead of one RPC each.

    Get one from :meth:`Client.authorizer`. :meth:`authorize` takes the arguments of
    :meth:`Client.authorize`, returns the same :class:`AuthorizeResult` and raises the same errors:
    :class:`InvalidArgument` with its violations for a malformed request, :class:`Unavailable`
    when the server cannot answer. Each call is tagged with an id and its answer matched by that
    id, so a slow argon2 verification never delays the calls sent after it. Calls take turns over
    the streams; when a stream ends (the server shutting down, a lost connection, a refused
    caller) every call waiting on it raises that error and the next call opens a new stream.

    Thread-safe. :meth:`close` (or leaving a ``with`` block) half-closes the streams, so calls
    already sent still get their answers, and waits for them; after it ``authorize`` raises
    ``ValueError``. Each call waits at most the client's ``timeout`` (then ``ServerError`` with
    code ``DEADLINE_EXCEEDED``, as a unary call would), and the server is told so: it bounds the
    work for that call as for a unary call with that deadline.
    """

    def __init__(
        self, stub: pb_grpc.AuthorizationStub, metadata: tuple[tuple[str, str], ...], timeout: float, streams: int
    ) -> None:
        if streams < 1:
            raise ValueError("streams must be at least 1")
        self._stub = stub
        self._metadata = metadata
        self._timeout = timeout
        self._streams: list[_AuthorizeStream | None] = [None] * streams
        self._turns = itertools.count()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False

    def authorize(
        self,
        access_key: str,
        private_key: str,
        client_ip: str,
        required_permission: Permission | str | int,
        destination: WithdrawalDestination | None = None,
        signed: SignedRequest | None = None,
        *,
        symbol: str = "",
    ) -> AuthorizeResult:
        """The same as :meth:`Client.authorize`, over a shared stream."""
        request = _authorize_request(
            access_key, private_key, client_ip, required_permission, destination, signed, symbol
        )
        stream, call_id = self._stream(), 0
        try:
            with self._lock:
                call_id = next(self._ids)
            answer = stream.send(call_id, request, self._timeout).result(self._timeout)
        except TimeoutError:
            stream.forget(call_id)
            error = ServerError(f"DEADLINE_EXCEEDED: no answer within {self._timeout:g} s")
            error.code = grpc.StatusCode.DEADLINE_EXCEEDED
            raise error from None
        if answer.HasField("error"):
            status = answer.error
            code = _STATUS_CODES.get(status.code, grpc.StatusCode.UNKNOWN)
            raise _error(code, status.message or code.name, status.details)
        return _authorize_result(answer.response)

    def _stream(self) -> _AuthorizeStream:
        """The next stream in turn, opened (again) if it is not running."""
        with self._lock:
            if self._closed:
                raise ValueError("this StreamingAuthorizer is closed")
            slot = next(self._turns) % len(self._streams)
            stream = self._streams[slot]
            if stream is None or stream.ended:
                stream = self._streams[slot] = _AuthorizeStream(self._stub, self._metadata)
            return stream

    def close(self) -> None:
        """Half-closes every stream and waits (up to the client's timeout) for the answers still due."""
        with self._lock:
            self._closed = True
            streams = [s for s in self._streams if s is not None]
        for stream in streams:
            stream.close()
        for stream in streams:
            stream.wait(self._timeout)

    def __enter__(self) -> StreamingAuthorizer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class _AuthorizeStream:
    """One AuthorizeStream call: requests go out through a queue (grpc's sending thread drains it),
    a reader thread hands each answer to the future waiting under its id."""

    def __init__(self, stub: pb_grpc.AuthorizationStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self._outgoing: queue.SimpleQueue[pb.AuthorizeStreamRequest | None] = queue.SimpleQueue()
        self._waiting: dict[int, Future[pb.AuthorizeStreamResponse]] = {}
        self._lock = threading.Lock()
        self._error: KeyguardError | None = None
        # No deadline: the stream lives as long as it is used; each message carries its own.
        self._call = stub.AuthorizeStream(self._requests(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="keyguard-authorize-stream", daemon=True)
        self._reader.start()

    @property
    def ended(self) -> bool:
        return self._error is not None

    def send(self, call_id: int, request: pb.AuthorizeRequest, timeout: float) -> Future[pb.AuthorizeStreamResponse]:
        future: Future[pb.AuthorizeStreamResponse] = Future()
        with self._lock:
            if self._error is not None:
                raise self._error
            self._waiting[call_id] = future
        self._outgoing.put(
            pb.AuthorizeStreamRequest(
                id=call_id, request=request, timeout_ms=min(max(1, int(timeout * 1000)), 2**32 - 1)
            )
        )
        return future

    def forget(self, call_id: int) -> None:
        with self._lock:
            self._waiting.pop(call_id, None)

    def close(self) -> None:
        self._outgoing.put(None)  # half-close: the server answers what it read, then ends the stream

    def wait(self, timeout: float) -> None:
        self._reader.join(timeout)
        if self._reader.is_alive():
            self._call.cancel()
            self._reader.join(timeout)

    def _requests(self) -> Iterator[pb.AuthorizeStreamRequest]:
        while (request := self._outgoing.get()) is not None:
            yield request

    def _read(self) -> None:
        error: KeyguardError
        try:
            for answer in self._call:
                with self._lock:
                    future = self._waiting.pop(answer.id, None)
                if future is not None:
                    future.set_result(answer)
            error = ServerError("the stream ended")  # after our half-close: nothing is waiting
        except grpc.RpcError as exc:
            error = domain_error(exc)
        with self._lock:
            self._error = error
            waiting, self._waiting = self._waiting, {}
        self._outgoing.put(None)  # lets grpc's sending thread finish
        for future in waiting.values():
            future.set_exception(error)


def _authorize_request(
    access_key: str,
    private_key: str,
    client_ip: str,
    required_permission: Permission | str | int,
    destination: WithdrawalDestination | None,
    signed: SignedRequest | None,
    symbol: str = "",
) -> pb.AuthorizeRequest:
    request = pb.AuthorizeRequest(
        access_key=access_key,
        private_key=private_key,
        client_ip=client_ip,
        required_permission=pb.Permission.ValueType(Permission.parse(required_permission)),
        symbol=symbol,
    )
    if destination is not None:
        request.destination.CopyFrom(
            pb.WithdrawalDestination(asset=destination.asset, address=destination.address, memo=destination.memo)
        )
    if signed is not None:
        request.signed.CopyFrom(
            pb.SignedRequest(
                payload=signed.payload,
                timestamp_ms=signed.timestamp_ms,
                nonce=signed.nonce,
                signature=signed.signature,
            )
        )
    return request


def _authorize_result(response: pb.AuthorizeResponse) -> AuthorizeResult:
    return AuthorizeResult(
        allowed=response.allowed,
        decision=Decision(response.decision),
        account_id=response.account_id,
        key_name=response.key_name,
        permission=Permission(response.permission) if response.permission else None,
    )


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def domain_error(exc: grpc.RpcError) -> KeyguardError:
    """The keyguard error a failed call stands for (INVALID_ARGUMENT with its field violations)."""
    assert isinstance(exc, grpc.Call)
    code = exc.code()
    status = rpc_status.from_call(exc) if code in _DETAILED else None
    return _error(code, exc.details() or code.name, status.details if status else ())


# The codes whose status details tell the error apart (the others' are not read).
_DETAILED = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)


def _error(code: grpc.StatusCode, message: str, details: Iterable[any_pb2.Any]) -> KeyguardError:
    """The keyguard error for a status: a failed call's, or a stream answer's ``error``."""
    retry_info = error_details_pb2.RetryInfo.DESCRIPTOR.full_name
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and any(d.TypeName() == retry_info for d in details):
        return StorageFull(message)  # worth retrying later, unlike a per-account limit
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        violations: list[FieldViolation] = []
        for detail in details:
            bad_request = error_details_pb2.BadRequest()
            if detail.Unpack(bad_request):  # False for any other kind of detail
                violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
        return InvalidArgument(violations, message)
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        error: KeyguardError = ServerError(f"{code.name}: {message}")
        error.code = code
        return error
    return cls(message)


def _time(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def _key(key: pb.ApiKey) -> ApiKey:
    return ApiKey(
        account_id=key.account_id,
        access_key=key.access_key,
        name=key.name,
        permission=Permission(key.permission),
        allowed_ips=tuple(key.allowed_ips),
        created_at=_time(key.created_at),
        last_used_at=_time(key.last_used_at) if key.HasField("last_used_at") else None,
        last_used_ip=key.last_used_ip,
        expires_at=_time(key.expires_at) if key.HasField("expires_at") else None,
        enabled=key.enabled,
        previous_key_valid_until=(
            _time(key.previous_key_valid_until) if key.HasField("previous_key_valid_until") else None
        ),
        key_type=KeyType(key.key_type or KeyType.SECRET),
        public_key=key.public_key,
        symbols=tuple(key.symbols),
        unrestricted_until=_time(key.unrestricted_until) if key.HasField("unrestricted_until") else None,
    )


def _settings(settings: pb.AccountSettings) -> AccountSettings:
    return AccountSettings(
        account_id=settings.account_id,
        address_management=settings.address_management,
        key_count=settings.key_count,
        max_keys=settings.max_keys,
        frozen=settings.frozen,
        address_management_off_at=(
            _time(settings.address_management_off_at) if settings.HasField("address_management_off_at") else None
        ),
    )


def _event(event: pb.AuditEvent) -> AuditEvent:
    return AuditEvent(
        id=event.id,
        time=_time(event.time),
        caller=event.caller,
        action=AuditAction(event.action),
        account_id=event.account_id,
        access_key=event.access_key,
        details=dict(event.details),
    )


def _address(entry: pb.WithdrawalAddress) -> WithdrawalAddress:
    return WithdrawalAddress(
        id=entry.id,
        asset=entry.asset,
        address=entry.address,
        memo=entry.memo,
        label=entry.label,
        created_at=_time(entry.created_at),
        usable_from=_time(entry.usable_from) if entry.HasField("usable_from") else None,
    )
