"""The Python client library: a connection that survives its node, and its pure state."""
