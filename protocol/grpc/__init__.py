"""The gRPC front: Triton's ``inference.GRPCInferenceService`` and ``grpc.health.v1`` on a lean HTTP/2 server.

- :mod:`protocol.grpc.server`: gRPC over HTTP/2 on asyncio, built on hyperframe and hpack (flow control,
  streams, compression, keepalive, GOAWAY); why not grpclib or grpcio: docs/performance-notes.md.
- :mod:`protocol.grpc.front`: the service's methods on the core, unary and streaming (decoupled models).
- :mod:`protocol.grpc.v2grpc`: the protobuf messages to and from the core's requests and responses.

The generated modules (``protocol/grpc_service_pb2.py``...) stay beside their .proto files in ``protocol/``.
"""
