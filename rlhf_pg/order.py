"""Which rows a process trains on, and with which random numbers: pure functions of (seed, step, rank).

Nothing here holds state, so a resumed run and a run on N processes make exactly the choices of an
uninterrupted single-process run with the same global batch:

* :func:`step_rows` — the dataset rows (prompts) of an RL step, a seeded permutation per data epoch,
  split contiguously across processes (a prompt's G samples stay on one process);
* :func:`rollout_uniforms` — the step's (completions, max_new_tokens) sampling uniforms, one row per
  GLOBAL completion, sliced to this process's rows;
* :func:`minibatch_partition` — this process's rows of each minibatch, derived from global rows;
* :func:`micro_batches` — how a minibatch (or a whole batch, for the passes without gradients) is cut
  into micro-batches: a fixed number of completions, or as many as fit a token budget.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch


def step_rows(n_rows: int, prompts_per_step: int, seed: int, step: int, rank: int = 0, world: int = 1) -> list[int]:
    """Dataset rows for process ``rank`` at RL step ``step``: global prompt g of the run is row
    ``perm_e[g mod n]`` with ``perm_e`` a permutation seeded by ``seed + e`` for data epoch e = g // n;
    the step's P prompts are split contiguously across the ``world`` processes."""
    per_rank = prompts_per_step // world
    rows = []
    first = step * prompts_per_step + rank * per_rank
    for g in range(first, first + per_rank):
        epoch, pos = divmod(g, n_rows)
        rows.append(int(_permutation(seed + epoch, n_rows)[pos]))
    return rows


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def rollout_uniforms(
    seed: int,
    step: int,
    n_completions: int,
    max_new_tokens: int,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """This process's rows of the step's (n_completions, max_new_tokens) uniforms in [0, 1).

    They come from one generator seeded by (seed, step) and are sliced by global row, so a
    completion's random draws do not depend on the number of processes."""
    g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + step)
    u = torch.rand(n_completions, max_new_tokens, generator=g)
    per_rank = n_completions // world
    return u[rank * per_rank : (rank + 1) * per_rank].to(device)


def minibatch_partition(
    seed: int, step: int, epoch: int, n_completions: int, n_minibatches: int, rank: int = 0, world: int = 1
) -> list[torch.Tensor]:
    """This process's LOCAL row indices of each of the epoch's ``n_minibatches`` minibatches.

    The global rows are cut into consecutive chunks of K = n_minibatches rows and each chunk deals its
    rows to the K minibatches in a random order (seeded by seed, step, epoch): every minibatch gets one
    row of every chunk (a stratified shuffle; a prompt's G samples spread over the minibatches). Process
    r holds the contiguous global rows [r·B/N, (r+1)·B/N); when B/N is a multiple of K it holds whole
    chunks, so every process has the same number of rows in every minibatch and the union over
    processes is exactly the 1-process minibatch. Rows within a minibatch keep their global order.

        chunk:      [0 1 2 3] [4 5 6 7]        K = 4, B = 8, 2 processes
        deal:        2 0 3 1   1 3 0 2         minibatch of each row
        minibatch 0: rows 1, 6 → process 0 has local row 1, process 1 has local row 2
    """
    K, per_rank = n_minibatches, n_completions // world
    if n_completions % world or per_rank % K:
        raise ValueError(f"{per_rank} rows per process cannot be split into {K} equal minibatches")
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + step) * 1_009 + epoch)
    deal = torch.argsort(torch.rand(n_completions // K, K, generator=g), dim=1).reshape(-1)  # (B,) minibatch of a row
    mine = deal[rank * per_rank : (rank + 1) * per_rank]  # (B/N,)
    return [(mine == k).nonzero().squeeze(-1) for k in range(K)]


def micro_batches(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    max_rows: int,
    max_tokens: int | None = None,
    count_max: Callable[[int], int] | None = None,
) -> list[torch.Tensor]:
    """Row indices (consecutive, in order) of each micro-batch of a (B, ·) batch.

    Without ``max_tokens``: chunks of ``max_rows`` rows. With it, rows join the current micro-batch
    until the next one would take its tokens over ``max_tokens`` or its rows over ``max_rows``; a
    micro-batch's tokens are its completions' real tokens plus each distinct prompt's once, which is
    what the packed passes run (forward.packed_forward), so the budget bounds their activations
    whatever the completions' lengths. A single row longer than the budget is a micro-batch of its own.

    ``count_max`` (several processes): maps this process's number of micro-batches to the largest over
    the processes; the largest micro-batches are then halved until every process runs that many, since
    sharded models (FSDP, ZeRO-3) meet in collectives at every forward."""
    B = completion_mask.shape[0]
    if max_tokens is None:
        return [torch.arange(i, min(i + max_rows, B)) for i in range(0, B, max_rows)]
    _, prompt_of = torch.unique(prompt_ids, dim=0, return_inverse=True)
    plen, clen = prompt_mask.sum(-1).tolist(), completion_mask.sum(-1).tolist()
    bounds: list[list[int]] = []  # [first row, end row) of each micro-batch
    tokens, seen = 0, set()
    for b, u in enumerate(prompt_of.tolist()):
        add = clen[b] + (plen[b] if u not in seen else 0)
        if bounds and bounds[-1][1] - bounds[-1][0] < max_rows and tokens + add <= max_tokens:
            bounds[-1][1] = b + 1
            tokens += add
        else:
            bounds.append([b, b + 1])
            tokens, seen = clen[b] + plen[b], set()
        seen.add(u)
    if count_max is not None:
        target = count_max(len(bounds))
        while len(bounds) < target:
            i = max(range(len(bounds)), key=lambda j: bounds[j][1] - bounds[j][0])
            lo, hi = bounds[i]
            if hi - lo < 2:
                raise RuntimeError(f"cannot cut {B} rows into {target} micro-batches")
            mid = (lo + hi) // 2
            bounds[i : i + 1] = [[lo, mid], [mid, hi]]
    return [torch.arange(lo, hi) for lo, hi in bounds]
