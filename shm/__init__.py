"""POSIX shared memory: mapped regions, tensor arenas, message rings and doorbells."""
