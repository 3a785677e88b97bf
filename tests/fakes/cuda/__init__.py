"""TEST DOUBLE of cuda-python (see tests/fakes/README.md)."""
