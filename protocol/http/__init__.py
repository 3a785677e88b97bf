"""The HTTP/REST front: KServe v2 / Triton's HTTP protocol on this project's own HTTP/1.1 server.

- :mod:`protocol.http.server`: the HTTP/1.1 server on httptools (connections, pipelining, bodies received
  straight into shared memory, chunked streams); it knows nothing of inference.
- :mod:`protocol.http.front`: the routes (``/v2/...``) on the core, the binary tensor extension and the
  system shared-memory extension.
- :mod:`protocol.http.v2json`: the v2 JSON codec (tensors as JSON arrays, shared-memory parameters).
- :mod:`protocol.http.generate`: the generate extension (``/generate``, ``/generate_stream``: Server-Sent Events).
"""
