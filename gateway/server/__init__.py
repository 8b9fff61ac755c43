"""The I/O shell of the gateway: Starlette app, WebSocket session runner, HTTP API."""
