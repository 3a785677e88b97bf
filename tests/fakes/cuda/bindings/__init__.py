"""TEST DOUBLE of cuda-python's cuda.bindings (see tests/fakes/README.md)."""
