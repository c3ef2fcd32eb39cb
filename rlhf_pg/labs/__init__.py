"""Diagnostics built on the public API: the GRPO-step benchmark (bench) and the gradient-variance lab
(variance).

Nothing is imported here, so ``from rlhf_pg.labs import bench`` stays standard-library-only at import
time (the ``rlhf-pg bench --help`` path relies on it).
"""
