"""Short-lived tokens that open event streams, for browsers: `EventSource` cannot send an
Authorization header, so a page POSTs for a token (with the header) and puts the token, never
the API key, in the stream's URL. Pure: the key and the clock are passed in.

A token is `<expiry>.<nonce>.<signature>`: the expiry in Unix seconds, a random nonce, and an
HMAC-SHA256 of both under a key derived from the API key (so a token says nothing about the
key, survives a restart of the server, and dies with a change of key). It opens event streams
only, any number of times until it expires, so EventSource's own reconnections work with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Final

TOKEN_SECONDS: Final = 60
_PURPOSE: Final = b"sd-rest event-stream token v1"
_SIGNATURE_BYTES: Final = 18


def token_key(api_key: str | None) -> bytes:
    """The signing key: derived from the API key, or random when there is none (tokens are
    then never needed, but still handed out, so that a page works the same either way)."""
    if api_key is None:
        return secrets.token_bytes(32)
    return hmac.new(api_key.encode(), _PURPOSE, hashlib.sha256).digest()


def _sign(key: bytes, payload: str) -> str:
    digest = hmac.new(key, payload.encode(), hashlib.sha256).digest()[:_SIGNATURE_BYTES]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def make_token(key: bytes, now: float, lifetime: int = TOKEN_SECONDS) -> tuple[str, int]:
    """(token, expiry in Unix seconds)."""
    expires = int(now) + lifetime
    payload = f"{expires}.{secrets.token_urlsafe(9)}"
    return f"{payload}.{_sign(key, payload)}", expires


def token_valid(key: bytes, token: str | None, now: float) -> bool:
    if not token or len(token) > 200:
        return False
    payload, _, signature = token.rpartition(".")
    expires, _, nonce = payload.partition(".")
    if not (expires.isascii() and expires.isdigit() and nonce):
        return False
    good = hmac.compare_digest(_sign(key, payload).encode(), signature.encode("utf-8", "replace"))
    return good and now <= int(expires)
