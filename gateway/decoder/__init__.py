"""SNAC decoding: model loading (``snac_model``), batched window decode (``engine``), and
the decode worker thread (``worker``). Import from those modules: this package exports
nothing, so that importing the worker does not pay for importing torch."""
