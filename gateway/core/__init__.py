"""Sans-I/O cores: pure, synchronous, no asyncio/httpx/starlette/torch imports.

Each core takes input in, hands queued output back and has ``flush()``; the thin
shells in ``gateway.upstream``, ``gateway.decoder`` and ``gateway.server`` do the I/O.
"""
