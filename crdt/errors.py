"""The one exception root of the crdt package."""


class CRDTError(Exception):
    """Root of every error raised by :mod:`crdt`."""


class CodecError(CRDTError):
    """Bytes or strings from outside could not be decoded: malformed, truncated, oversized,
    of an unknown version, or hostile. Raised by every decoder in this package, never
    anything else for bad input."""
