"""How requests reach a model's instances: Triton's schedulers.

- :mod:`kernel.scheduling.scheduler`: the default scheduler (requests in order, each instance kept busy) and
  the dynamic batcher (preferred sizes, queue delays, priorities, queue policies, ordering).
- :mod:`kernel.scheduling.sequence`: the sequence batcher (Direct and Oldest, correlation IDs, control
  inputs, implicit state, idle timeouts, iterative sequences).
"""
