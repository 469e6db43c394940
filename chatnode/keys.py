"""Cluster keys as text: 64 hex digits or base64 (standard or URL-safe, padding optional) of
exactly 32 bytes. One parser for the configuration check, the keyring and discovery."""

from __future__ import annotations

import base64
import binascii
from typing import Final

__all__ = ["KEY_LEN", "parse_key"]

KEY_LEN: Final = 32


def parse_key(text: str) -> bytes:
    """A 32-byte key from 64 hex digits or base64 text; ``ValueError`` otherwise."""
    s = text.strip()
    if len(s) == 64:
        try:
            return bytes.fromhex(s)
        except ValueError:
            pass
    padded = (s + "=" * (-len(s) % 4)).encode("ascii", "replace")
    for altchars in (None, b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=altchars, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == KEY_LEN:
            return raw
    raise ValueError("a cluster key must be 64 hex digits or base64 of exactly 32 bytes")
