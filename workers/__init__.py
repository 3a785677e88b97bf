"""Worker processes: one per model instance, each running one backend."""
