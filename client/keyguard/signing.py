"""Signed requests with ED25519 keys: the one definition of what is signed.

Exchanges let bots sign each request with an asymmetric key so the exchange
never holds a usable secret. keyguard stores only the public key; the bot signs
``access_key \\n timestamp_ms \\n nonce \\n payload`` (UTF-8) with its private key.
Through Envoy the payload is :func:`envoy_payload` of the HTTP request.

A public module of the client: bots sign with it (``sign_request``, also ``keyguard.sign_request``)
and the server verifies with it (``canonical``, ``verify``, ``load_public_key``), so both sides
share one definition without the server reaching into the client's private modules.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import time
from urllib.parse import quote

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from keyguard._models import SignedRequest, WithdrawalDestination


def canonical(access_key: str, timestamp_ms: int, nonce: str, payload: str) -> bytes:
    return f"{access_key}\n{timestamp_ms}\n{nonce}\n{payload}".encode()


def envoy_payload(
    method: str, path: str, body: bytes = b"", destination: WithdrawalDestination | None = None, symbol: str = ""
) -> str:
    """The payload an ED25519 key signs for a request through Envoy; keyguard rebuilds it from
    what Envoy forwards, so a changed method, path, query, body, destination or symbol breaks the
    signature.

    ``METHOD PATH?QUERY BODY_SHA256`` (``path`` exactly as sent, query included;
    the lower-case hex SHA-256 of the body, of b"" when there is none), and for
    a withdrawal `` asset=A&address=B&memo=C``, for a trade that names its
    symbol (the symbol header, as sent) `` symbol=S``, each value percent-encoded
    (UTF-8; everything but letters, digits and -._~). Single spaces separate the
    parts (no part can hold one), so the payload is one printable line: keyguard
    refuses control characters in payloads.
    """
    parts = [method, path, hashlib.sha256(body).hexdigest()]
    if destination is not None:
        fields = (("asset", destination.asset), ("address", destination.address), ("memo", destination.memo))
        parts.append("&".join(f"{name}={quote(value, safe='')}" for name, value in fields))
    if symbol:
        parts.append(f"symbol={quote(symbol, safe='')}")
    return " ".join(parts)


def sign_request(
    private_key_pem: str | bytes,
    access_key: str,
    payload: str,
    *,
    nonce: str | None = None,
    timestamp_ms: int | None = None,
) -> SignedRequest:
    """What a bot does for every request: sign it with its ED25519 private key (PEM)."""
    pem = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    nonce = nonce or secrets.token_urlsafe(16)
    timestamp_ms = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
    signature = key.sign(canonical(access_key, timestamp_ms, nonce, payload))
    return SignedRequest(payload, timestamp_ms, nonce, base64.b64encode(signature).decode())


def new_key_pair() -> tuple[str, str]:
    """(private key PEM, public key PEM) of a fresh Ed25519 key."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return private.decode(), public_pem(key.public_key())


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(text: str) -> Ed25519PublicKey:
    """A PEM public key, or the base64 of its 32 raw bytes; ValueError otherwise."""
    try:
        if "BEGIN" in text:
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, TypeError):
        raise ValueError("not an Ed25519 public key (PEM or base64 of 32 bytes)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def verify(public_key: Ed25519PublicKey, access_key: str, signed: SignedRequest) -> bool:
    try:
        signature = base64.b64decode(signed.signature, validate=True)
        public_key.verify(signature, canonical(access_key, signed.timestamp_ms, signed.nonce, signed.payload))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True
