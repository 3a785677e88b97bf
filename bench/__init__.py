"""bench: perf_analyzer's counterpart for edge-kernel and the comparison with the reference Triton.

``python -m bench -m MODEL ...`` measures one model on any KServe v2 server (or in-process);
``python -m bench compare ...`` runs the scenarios of docs/performance.md against ours and Triton.
"""
