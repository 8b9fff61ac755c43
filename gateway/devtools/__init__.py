"""Development tools, shipped with the package: the fake vLLM and the helpers that run it.

* :mod:`gateway.devtools.fake_vllm`: a fake ``vllm serve`` for Orpheus (the
  ``voicegw fake-vllm`` command, the demo's upstream, and the upstream of tests and
  benchmarks);
* :mod:`gateway.devtools.running`: the fake on a loopback socket, in the caller's event
  loop or in its own thread.

The gateway's runtime path imports nothing from here, except ``voicegw fake-vllm``
and ``voicegw serve --demo``, which start the fake.
"""
