"""Models that call models, in the front: ensembles (:mod:`kernel.pipelines.ensemble`) and the requests python
models make through BLS (:mod:`kernel.pipelines.bls`). Tensors pass between workers by reference in shared
memory, never through the front's heap (docs/pipelines.md)."""
