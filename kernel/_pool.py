"""The descriptor pool of this project's generated protobuf modules.

Our .proto files declare the same fully-qualified names as Triton's
(``inference.ModelConfig``, ``grpc.health.v1.HealthCheckRequest``...), so
registering them in protobuf's default pool would clash with ``tritonclient``
or ``grpclib.health`` loaded in the same process. A private pool keeps both
usable side by side; the wire format is unaffected.

Every generated ``_pb2`` module registers here: ``kernel/model_config_pb2.py``
and the ``protocol/*_pb2.py`` modules alike (scripts/gen_protos.py rewrites
them so), since ``protocol/grpc_service.proto`` imports
``kernel/model_config.proto`` and both must be in one pool. It lives in
``kernel/`` because ``kernel/`` must not import ``protocol/``.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
