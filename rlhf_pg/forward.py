"""The forward passes of training: log π(a_t|s_t), entropy and V(s_t) of a batch's completions.

:func:`forward` runs one micro-batch (with or without gradients) and returns a :class:`ForwardResult`;
:func:`forward_no_grad` runs a whole batch in micro-batches without gradients (old log-probs,
reference log-probs, rollout values). Both work for the policy, the policy with a value head, the
reference model and a separate critic (which has no LM head: its result has no log-probs).

Two savings, each checked against the plain computation in tests/test_trainer.py:

* padding is trimmed per micro-batch (leading prompt columns that are all padding, trailing
  completion columns past the longest completion) and logits are computed only over the completion
  positions (``logits_to_keep``);
* with ``shared_prefix`` each distinct prompt is run once and its G completions attend to that one
  copy of its keys/values (:func:`shared_prefix_forward`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch

from . import core
from .batch import Batch
from .rollout import position_ids


@dataclass(frozen=True)
class PassSettings:
    """How the passes run (from the config; the same for every pass of a run)."""

    temperature: float = 1.0
    """τ of the sampled policy softmax(logits/τ), whose log-probs are trained."""
    shared_prefix: bool = True
    """Run each distinct prompt once per micro-batch (off under gradient checkpointing)."""
    entropy_grad: bool = False
    """Keep the entropy in the autograd graph (only when an entropy bonus is trained)."""
    autocast: Callable[[], AbstractContextManager] = field(default=nullcontext)
    """Mixed-precision context (the accelerator's autocast)."""


@dataclass
class ForwardResult:
    """(B, T) tensors at the completion positions, zero-padded to the batch's T; None where not computed."""

    logprobs: torch.Tensor | None = None
    """log softmax(logits/τ)[a_t]; None for a model without an LM head (a separate critic)."""
    entropy: torch.Tensor | None = None
    """H(π(·|s_t)); only with ``with_entropy``."""
    values: torch.Tensor | None = None
    """V(s_t), read at the positions whose logits predict a_t; None without a value head."""


def forward(model, mb: Batch, s: PassSettings, with_entropy: bool = False) -> ForwardResult:
    """One pass of ``model`` over micro-batch ``mb`` (gradients follow the caller's grad mode)."""
    T = mb.completion_ids.shape[1]
    p0 = int(mb.prompt_mask.any(0).float().argmax())  # first prompt column with a real token
    t1 = int(mb.completion_mask.sum(-1).max().item())  # longest completion
    pids, pmask = mb.prompt_ids[:, p0:], mb.prompt_mask[:, p0:]
    cids, cmask = mb.completion_ids[:, :t1], mb.completion_mask[:, :t1].long()
    with s.autocast():
        if s.shared_prefix:
            logits, values = shared_prefix_forward(model, pids, pmask, cids, cmask)
        else:
            ids, attn = torch.cat([pids, cids], 1), torch.cat([pmask, cmask], 1)  # (B, P'+t1)
            out = model(
                input_ids=ids,
                attention_mask=attn,
                position_ids=position_ids(attn),
                logits_to_keep=t1 + 1,
                use_cache=False,
            )
            logits = out.logits[:, :-1] if out.logits is not None else None  # (B, t1, V); None: a critic
            values = out["value_preds"][:, -(t1 + 1) : -1] if "value_preds" in out else None  # (B, t1)
    logp = ent = None
    if logits is not None:
        logp, ent = core.token_logprobs(logits, cids, s.temperature, with_entropy, entropy_grad=s.entropy_grad)

    def pad(x):  # (B, t1) → (B, T) float
        return torch.nn.functional.pad(x.float(), (0, T - t1)) if x is not None else None

    return ForwardResult(pad(logp), pad(ent), pad(values))


def shared_prefix_forward(model, pids, pmask, cids, cmask) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(B, T, V) logits predicting each completion token (and (B, T) values), running each
    distinct prompt once.

    The G completions of a prompt attend to ONE copy of its keys/values: the prompt is run once
    (with gradients), its KV cache is indexed out to the rows (an index_select, differentiable),
    and the completions run on top of it. The gradient of all G completions flows back through
    the shared prompt pass; the result equals the padded full-sequence forward
    (tests/test_trainer.py checks logits and gradients) with (G−1)·P fewer token passes.
    """
    uniq, inv = torch.unique(pids, dim=0, return_inverse=True)  # (U, P), (B,)
    first = torch.empty(uniq.shape[0], dtype=torch.long, device=pids.device).scatter_(
        0, inv, torch.arange(pids.shape[0], device=pids.device)
    )
    umask = pmask[first]  # identical prompts have identical masks
    pre = model(
        input_ids=uniq, attention_mask=umask, position_ids=position_ids(umask), use_cache=True, logits_to_keep=1
    )
    has_logits = pre.logits is not None  # a separate critic has no LM head
    logits = pre.logits[:, -1][inv][:, None] if has_logits else None  # (B, 1, V): predicts token 0
    has_v = "value_preds" in pre
    values = pre["value_preds"][:, -1][inv][:, None] if has_v else None  # (B, 1) V(s_0)
    if cids.shape[1] == 1:
        return logits, values
    cache = pre.cache
    cache.batch_select_indices(inv)  # (U, ...) → (B, ...)
    prompt_len = pmask.sum(-1, keepdim=True)  # (B, 1)
    steps = cids.shape[1] - 1
    pos = prompt_len + torch.arange(steps, device=cids.device)[None, :]  # (B, T−1)
    out = model(
        input_ids=cids[:, :steps],
        attention_mask=torch.cat([pmask, cmask[:, :steps]], 1),
        position_ids=pos,
        cache=cache,
        use_cache=True,
    )
    if has_logits:
        logits = torch.cat([logits, out.logits], 1)
    if has_v:
        values = torch.cat([values, out["value_preds"]], 1)
    return logits, values


@torch.no_grad()
def forward_no_grad(model, batch: Batch, s: PassSettings, micro_batch_size: int) -> ForwardResult:
    """:func:`forward` over the whole batch in micro-batches, without gradients; results concatenated."""
    parts = [
        forward(model, batch.select(torch.arange(i, min(i + micro_batch_size, batch.size))), s)
        for i in range(0, batch.size, micro_batch_size)
    ]

    def cat(name: str) -> torch.Tensor | None:
        xs = [getattr(p, name) for p in parts]
        return torch.cat(xs) if xs and xs[0] is not None else None

    return ForwardResult(cat("logprobs"), None, cat("values"))
