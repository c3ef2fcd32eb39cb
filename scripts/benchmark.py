"""Benchmark of one GRPO step, rlhf-pg vs the plain `transformers` way: see rlhf_pg/labs/bench.py.

python scripts/benchmark.py [options]     # the same as `rlhf-pg bench [options]`
"""

from rlhf_pg.labs.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
