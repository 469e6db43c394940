"""The HTTP/WebSocket front: the aiohttp app, rate limits, the views endpoints and the static
web client."""
