"""The descriptor pool of this project's generated protobuf modules.

Our .proto files declare the same fully-qualified names as Triton's
(``inference.ModelConfig``, ``grpc.health.v1.HealthCheckRequest``...), so
registering them in protobuf's default pool would clash with ``tritonclient``
or ``grpclib.health`` loaded in the same process. A private pool keeps both
usable side by side; the wire format is unaffected.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
