"""The forward passes of training: log π(a_t|s_t), entropy and V(s_t) of a batch's completions.

:func:`forward` runs one micro-batch (with or without gradients) and returns a :class:`ForwardResult`;
:func:`forward_no_grad` runs a whole batch in micro-batches without gradients (old log-probs,
reference log-probs, rollout values). Both work for the policy, the policy with a value head, the
reference model and a separate critic (which has no LM head: its result has no log-probs).

Two savings, each checked against the plain computation in tests/test_trainer.py:

* padding is trimmed per micro-batch (leading prompt columns that are all padding, trailing
  completion columns past the longest completion) and logits are computed only over the completion
  positions (``logits_to_keep``);
* with ``packed`` (the default) each distinct prompt is run once with its completions packed after it
  in ONE row, without padding between them: a block attention mask lets each completion see the
  prompt and itself only, and position ids restart after the prompt (:func:`packed_forward`);
* with ``shared_prefix`` (where packing cannot run: an attention kernel without custom masks) each
  distinct prompt is run once and its G completions, padded to the longest, attend to that one copy
  of its keys/values (:func:`shared_prefix_forward`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from . import core, order
from .batch import Batch
from .rollout import position_ids

PACK_TOKENS = 512
"""Default cap on the completion tokens of one packed row (see :class:`PassSettings`)."""


@dataclass(frozen=True)
class PassSettings:
    """How the passes run (from the config; the same for every pass of a run)."""

    temperature: float = 1.0
    """τ of the sampled policy softmax(logits/τ), whose log-probs are trained."""
    shared_prefix: bool = True
    """Run each distinct prompt once per micro-batch (off under gradient checkpointing)."""
    packed: bool = False
    """Pack each prompt's completions into one row after it, without padding (:func:`packed_forward`);
    takes precedence over ``shared_prefix``."""
    pack_tokens: int = PACK_TOKENS
    """Most completion tokens in one packed row (a longer group is split over rows, each with its
    own copy of the prompt): attention over a row costs its length squared."""
    entropy_grad: bool = False
    """Keep the entropy in the autograd graph (only when an entropy bonus is trained)."""
    autocast: Callable[[], AbstractContextManager] = field(default=nullcontext)
    """Mixed-precision context (the accelerator's autocast)."""


LAYOUTS = {
    "packed": {"packed": True},
    "shared prefix": {"packed": False, "shared_prefix": True},
    "padded": {"packed": False, "shared_prefix": False},
}
"""The pass layouts by name (what :class:`PassSettings` fields select each), for comparing them."""


def with_layout(s: PassSettings, name: str) -> PassSettings:
    """``s`` with the pass layout ``name`` of :data:`LAYOUTS`."""
    return dataclasses.replace(s, **LAYOUTS[name])


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
        if s.packed:
            logp, ent, values = packed_forward(model, pids, pmask, cids, cmask, s, with_entropy)
            return ForwardResult(_pad_to(logp, T), _pad_to(ent, T), _pad_to(values, T))
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

    return ForwardResult(_pad_to(logp, T), _pad_to(ent, T), _pad_to(values, T))


def _pad_to(x: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """(B, t1) → (B, T) float, zero-padded on the right."""
    return torch.nn.functional.pad(x.float(), (0, T - x.shape[1])) if x is not None else None


def attention_implementation(model) -> str | None:
    """The attention kernel a (possibly wrapped: DDP, value head, PEFT) model runs with, from its config."""
    while hasattr(model, "module") and not hasattr(model, "config"):
        model = model.module  # DDP / DeepSpeed engines
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


PACKABLE_ATTENTION = ("sdpa", "eager")
"""Attention kernels that take a custom 4D mask (transformers passes a 4D mask through as it is)."""


def distinct_prompts(pids: torch.Tensor, pmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct rows of (B, P) prompt ids: (U, P) ids, their (U, P) masks, and each row's index (B,)."""
    uniq, inv = torch.unique(pids, dim=0, return_inverse=True)
    first = torch.empty(uniq.shape[0], dtype=torch.long, device=pids.device).scatter_(
        0, inv, torch.arange(pids.shape[0], device=pids.device)
    )
    return uniq, pmask[first], inv  # identical prompts have identical masks


def packed_layout(pids, pmask, cmask, pack_tokens: int) -> dict[str, torch.Tensor]:
    """Where every token of a micro-batch goes in the packed rows (see :func:`packed_forward`).

    Row r holds distinct prompt ``prompt_of[r]`` (left-padded to the micro-batch's P columns) and
    then, back to back, the completions assigned to it (in batch order, at most ``pack_tokens``
    tokens per row unless one completion is longer). Returns the (R, L) ids-to-be, segment ids
    (−1 real prompt, −2 padding, b ≥ 0 completion of batch row b), positions, and for every (b, t)
    the packed column of token t of row b (``col``) and its row (``row``)."""
    B, P = pids.shape
    device = pids.device
    uniq, umask, inv = distinct_prompts(pids, pmask)
    nz = cmask.bool()
    # a completion runs to its last real token (masks are prefixes; this also bounds one with a hole)
    lengths = torch.where(nz.any(1), nz.shape[1] - nz.flip(1).float().argmax(1), torch.zeros_like(inv)).tolist()
    rows_prompt: list[int] = []  # distinct prompt of each packed row
    row_fill: list[int] = []
    open_row: dict[int, int] = {}  # distinct prompt → its row being filled
    row_of, off_of = [], []
    for u, n in zip(inv.tolist(), lengths):
        r = open_row.get(u)
        if r is None or (row_fill[r] > 0 and row_fill[r] + n > pack_tokens):
            r = open_row[u] = len(rows_prompt)
            rows_prompt.append(u)
            row_fill.append(0)
        row_of.append(r)
        off_of.append(row_fill[r])
        row_fill[r] += n
    R, Lc = len(rows_prompt), max(max(row_fill), 1)
    prompt_of = torch.tensor(rows_prompt, device=device)
    row = torch.tensor(row_of, device=device)
    off = torch.tensor(off_of, device=device)
    t1 = cmask.shape[1]
    col = P + off[:, None] + torch.arange(t1, device=device)[None, :]  # (B, t1): packed column of token t
    col = torch.where(nz, col, torch.zeros_like(col))
    seg = torch.full((R, P + Lc), -2, dtype=torch.long, device=device)
    seg[:, :P] = torch.where(umask[prompt_of].bool(), -1, -2)
    rr, cc = row[:, None].expand_as(col)[nz], col[nz]
    seg[rr, cc] = torch.arange(B, device=device)[:, None].expand_as(col)[nz]
    pos = torch.zeros((R, P + Lc), dtype=torch.long, device=device)
    plen = umask.sum(-1)  # (U,) prompt lengths
    pos[:, :P] = position_ids(umask[prompt_of])
    pos[rr, cc] = (plen[inv][:, None] + torch.arange(t1, device=device)[None, :]).expand_as(col)[nz]
    return {"prompt_of": prompt_of, "uniq": uniq, "seg": seg, "pos": pos, "row": row, "col": col, "nz": nz}


def block_mask(seg: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(R, 1, L, L) attention mask of packed rows: a prompt token sees the real prompt tokens before
    it; a completion token sees the real prompt and its own completion's earlier tokens. Every token
    also sees itself, so padding rows never softmax over nothing (their outputs are never read).
    Boolean (True = attend) for SDPA; with ``dtype``, additive (0 / the dtype's minimum) for eager."""
    L = seg.shape[1]
    causal = torch.ones((L, L), dtype=torch.bool, device=seg.device).tril()
    q, k = seg[:, :, None], seg[:, None, :]
    allowed = causal & ((k == -1) | ((k == q) & (q >= 0)))
    allowed |= torch.eye(L, dtype=torch.bool, device=seg.device)
    allowed = allowed[:, None]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=seg.device).masked_fill(~allowed, torch.finfo(dtype).min)


def packed_forward(model, pids, pmask, cids, cmask, s: PassSettings, with_entropy: bool):
    """(B, t1) log-probs, entropies (with ``with_entropy``) and values of a micro-batch, with each
    distinct prompt's completions packed after ONE copy of it.

    One forward over R rows [prompt | completion 1 | completion 2 | …], no padding between
    completions; the block mask (:func:`block_mask`) keeps each completion to the prompt and itself,
    and its positions continue the prompt's, so each token computes what the padded full-sequence
    forward computes (tests/test_trainer.py checks log-probs, values and gradients). Logits are kept
    from the last prompt column on (it predicts every completion's first token); the log-softmax runs
    once per packed position and each token reads its own. Against :func:`shared_prefix_forward` it
    drops the padding of shorter completions (about half the tokens of a typical GRPO batch)."""
    lay = packed_layout(pids, pmask, cmask, s.pack_tokens)
    R, L = lay["seg"].shape
    P = pids.shape[1]
    ids = torch.full((R, L), 0, dtype=torch.long, device=pids.device)
    ids[:, :P] = lay["uniq"][lay["prompt_of"]]
    nz, row, col = lay["nz"], lay["row"], lay["col"]
    ids[row[:, None].expand_as(col)[nz], col[nz]] = cids[nz]
    impl = attention_implementation(model)
    mask = block_mask(lay["seg"], None if impl != "eager" else next(model.parameters()).dtype)
    keep = L - P + 1  # logits from the last prompt column on
    out = model(input_ids=ids, attention_mask=mask, position_ids=lay["pos"], logits_to_keep=keep, use_cache=False)
    # kept index of the logits predicting token t of row b: the column before it, minus P − 1
    pred = torch.where(torch.arange(col.shape[1], device=col.device)[None, :] == 0, 0, col - P)
    pred = torch.where(nz, pred.clamp(min=0), torch.zeros_like(pred))
    flat = row[:, None] * keep + pred  # (B, t1) rows of the flattened kept logits
    logp = ent = values = None
    if out.logits is not None:
        V = out.logits.shape[-1]
        lg = out.logits.reshape(-1, V)
        lp, e = core.gathered_logprobs(lg, flat[nz], cids[nz], s.temperature, with_entropy, entropy_grad=s.entropy_grad)
        logp = lp.new_zeros(nz.shape).index_put((nz,), lp)  # (B, t1), 0 off the completions
        ent = torch.where(nz, e[flat], torch.zeros((), device=e.device)) if e is not None else None
    if "value_preds" in out:
        v = out["value_preds"][:, -keep:].reshape(-1)
        values = torch.where(nz, v[flat], torch.zeros((), dtype=v.dtype, device=v.device))
    return logp, ent, values


def shared_prefix_forward(model, pids, pmask, cids, cmask) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(B, T, V) logits predicting each completion token (and (B, T) values), running each
    distinct prompt once.

    The G completions of a prompt attend to ONE copy of its keys/values: the prompt is run once
    (with gradients), its KV cache is indexed out to the rows (an index_select, differentiable),
    and the completions run on top of it. The gradient of all G completions flows back through
    the shared prompt pass; the result equals the padded full-sequence forward
    (tests/test_trainer.py checks logits and gradients) with (G−1)·P fewer token passes.
    """
    uniq, umask, inv = distinct_prompts(pids, pmask)  # (U, P), (U, P), (B,)
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


@contextmanager
def weight_casts_kept(*models: torch.nn.Module | None) -> Iterator[None]:
    """Autocast's low-precision copy of each fp32 weight made once for the whole block, not once per forward.

    Autocast keeps the copies it makes of weights only while an autocast region is open, and only of leaf
    tensors that require grad. Each micro-batch's forward opens and closes its own region, so every forward
    casts the whole model again (for SmolLM2-135M the tied LM head / embedding alone is 57 MB of bf16).
    Inside this block the region count stays above zero between the forwards (autocast stays
    off outside them, so backward passes run as before), and the copies survive until the block ends. Under
    ``no_grad`` the fp32 weights of frozen models (the reference) are marked as requiring grad meanwhile, so
    autocast keeps their copies too. The block must end before the weights change (before the optimizer
    step). Weights that are sharded (FSDP, ZeRO-3) are not kept: a full copy per layer would undo the
    sharding. The arithmetic is unchanged: the same cast of the same weights."""
    from .distributed import sharding_kind

    kept = [m for m in models if m is not None and sharding_kind(m) == "none"]
    if not kept:
        yield
        return
    frozen = []
    if not torch.is_grad_enabled():
        frozen = [p for m in kept for p in m.parameters() if not p.requires_grad and p.dtype == torch.float32]
    for p in frozen:
        p.requires_grad_(True)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        for p in frozen:
            p.requires_grad_(False)


@torch.no_grad()
def store_frozen_in_autocast_dtype(model: torch.nn.Module, autocast: Callable[[], AbstractContextManager]) -> None:
    """Keep a frozen model's ``nn.Linear`` weights (and biases) in the dtype the run's autocast casts them
    to (nothing when ``autocast`` does not enable torch's autocast).

    Under autocast every ``F.linear`` casts its fp32 weight to the low-precision dtype (round to nearest,
    the same as ``Tensor.to``) before the product, so a weight stored already cast gives the same product
    bit for bit, without the fp32 copy or the cast in each pass (SmolLM2-135M's reference: 315 MB in all,
    against 540 MB of its file's pages that the fp32 model kept resident). Left in fp32: parameters any other
    module also uses (a tied embedding: its lookup is not autocast, so the residual stream stays fp32),
    norms, subclasses of ``nn.Linear`` (adapters, quantized layers), and sharded models. Only for models
    that never run outside the autocast (the frozen reference)."""
    from .distributed import sharding_kind

    params = list(model.parameters())
    if not params or sharding_kind(model) != "none":
        return
    device = params[0].device.type
    with autocast():
        if not torch.is_autocast_enabled(device):
            return
        dtype = torch.get_autocast_dtype(device)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    elsewhere = {id(p) for m in model.modules() if type(m) is not torch.nn.Linear for p in m.parameters(recurse=False)}
    converted = False
    for m in linears:
        if any(id(p) in elsewhere or p.dtype != torch.float32 or p.requires_grad for p in m.parameters(False)):
            continue
        m.to(dtype)
        converted = True
    if converted and device == "cpu":
        # A model loaded from safetensors views the file's mmap, and its pages, once read, stay resident
        # (in RSS) while any tensor still views the mapping: copy what was not converted, so it is released.
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype != dtype:
                t.data = t.data.clone()


@torch.no_grad()
def forward_no_grad(model, batch: Batch, s: PassSettings, micro_batches: int | list[torch.Tensor]) -> ForwardResult:
    """:func:`forward` over the whole batch in micro-batches, without gradients; results concatenated in the
    batch's order. ``micro_batches``: the row indices of each (consecutive, e.g. ``Trainer.micro_batches``
    with a token budget), or a number of completions per micro-batch."""
    rows = (
        micro_batches
        if not isinstance(micro_batches, int)
        else order.micro_batches(batch.prompt_ids, batch.prompt_mask, batch.completion_mask, micro_batches)
    )
    with weight_casts_kept(model):
        parts = [forward(model, batch.select(r.to(batch.completion_mask.device)), s) for r in rows]

    def cat(name: str) -> torch.Tensor | None:
        xs = [getattr(p, name) for p in parts]
        return torch.cat(xs) if xs and xs[0] is not None else None

    return ForwardResult(cat("logprobs"), None, cat("values"))
