"""order.micro_batches: how a batch is cut into micro-batches, by completions or by a token budget."""

import pytest
import torch

from rlhf_pg.order import micro_batches


def _batch(prompt_lens, completion_lens, P=6, T=8):
    """(B, P) left-padded prompts (equal rows = the same prompt) and (B, T) completion masks."""
    pids = torch.zeros(len(prompt_lens), P, dtype=torch.long)
    pmask = torch.zeros(len(prompt_lens), P)
    for i, n in enumerate(prompt_lens):
        pids[i, P - n :] = torch.arange(1, n + 1) + 100 * n  # prompts of equal length are the same prompt
        pmask[i, P - n :] = 1
    cmask = torch.zeros(len(completion_lens), T)
    for i, n in enumerate(completion_lens):
        cmask[i, :n] = 1
    return pids, pmask, cmask


def _tokens(rows, pids, pmask, cmask):
    """A micro-batch's tokens as the packed pass runs them: completions, plus each distinct prompt once."""
    uniq = {tuple(pids[r].tolist()): pmask[r].sum().item() for r in rows.tolist()}
    return sum(uniq.values()) + cmask[rows].sum().item()


def test_without_a_budget_fixed_chunks_of_completions():
    pids, pmask, cmask = _batch([3] * 7, [2] * 7)
    parts = micro_batches(pids, pmask, cmask, max_rows=3)
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6]]


def test_token_budget_bounds_each_micro_batch_and_keeps_the_order():
    # two groups of 4 (prompts of 3 and 5 tokens), completions of unequal lengths
    lens = [1, 8, 2, 2, 7, 1, 1, 3]
    pids, pmask, cmask = _batch([3, 3, 3, 3, 5, 5, 5, 5], lens)
    parts = micro_batches(pids, pmask, cmask, max_rows=8, max_tokens=12)
    assert torch.cat(parts).tolist() == list(range(8))  # every row once, in order, consecutive
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3], [4], [5, 6, 7]]
    for p in parts:
        assert _tokens(p, pids, pmask, cmask) <= 12
    # each is as large as the budget allows: the next row would take it over
    for p, nxt in zip(parts, parts[1:]):
        assert _tokens(torch.cat([p, nxt[:1]]), pids, pmask, cmask) > 12


def test_a_row_over_the_budget_is_alone_and_max_rows_still_caps():
    pids, pmask, cmask = _batch([3] * 5, [8, 1, 1, 1, 1])
    parts = micro_batches(pids, pmask, cmask, max_rows=2, max_tokens=6)
    assert [p.tolist() for p in parts] == [[0], [1, 2], [3, 4]]  # 11 tokens alone; then 2 rows (the cap)


def test_every_process_gets_the_same_count():
    pids, pmask, cmask = _batch([3] * 6, [1] * 6)
    parts = micro_batches(pids, pmask, cmask, max_rows=8, max_tokens=100, count_max=lambda n: max(n, 4))
    assert len(parts) == 4 and torch.cat(parts).tolist() == list(range(6))
    with pytest.raises(RuntimeError, match="cannot cut 6 rows into 7"):
        micro_batches(pids, pmask, cmask, max_rows=8, max_tokens=100, count_max=lambda n: 7)
