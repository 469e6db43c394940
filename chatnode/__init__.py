"""chatnode: a high-availability chat server."""

__version__ = "0.1.0"
