"""Protocol schemas (Triton-compatible .proto files) and their generated Python modules."""
