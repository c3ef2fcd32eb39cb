"""Rollout engine: left-padded prompts → G sampled completions each → masks and log-probs.

How it avoids redundant work:

* the prompt prefill runs once per prompt; its KV cache is then repeated G times for decoding
  (``DynamicCache.batch_repeat_interleave``), instead of prefilling P×G rows;
* rows that finished (EOS or a stop string) are dropped from the decoding batch and the cache, so
  they stop costing compute;
* the log-prob of each sampled token under the sampling policy softmax(logits/τ) is recorded as it
  is sampled, so a single-epoch, single-minibatch step needs no extra "old log-probs" forward pass.

Positions: with left padding, position ids are cumsum(attention_mask) − 1, passed explicitly in every
forward (here and in the trainer) so sampling and training see identical positions.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .batch import Batch
from .core import sample_from_logits


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists → (N, L) ids and attention mask, padded on the left."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s) :] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def contains_stop(tokenizer, rows: list[list[int]], stops: list[str]) -> list[bool]:
    """Whether each row's decoded text (special tokens removed) contains one of ``stops``.

    The one stop rule of every backend: a completion ends with the first token after which its text
    contains a stop string (:func:`generate` checks as it samples, :func:`stop_cut` afterwards)."""
    stops = [s for s in stops if s]
    if not stops:
        return [False] * len(rows)
    texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
    return [any(s in t for s in stops) for t in texts]


def stop_cut(tokenizer, ids: list[int], stops: list[str]) -> int:
    """Length of ``ids`` up to and including the first token that completes a stop string."""
    if not any(stops):
        return len(ids)
    hits = contains_stop(tokenizer, [ids[: t + 1] for t in range(len(ids))], stops)
    return next((t + 1 for t, hit in enumerate(hits) if hit), len(ids))


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    group_size: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    decode: str = "hf",
) -> Batch:
    """Sample ``group_size`` completions for each prompt (token id lists) with a KV cache.

    Returns a :class:`Batch` of B = len(prompts)·G rows; rows i·G … i·G+G−1 belong to prompt i.
    ``uniforms`` (B, max_new_tokens) in [0, 1), if given, drive the sampling by inverse CDF (row b's
    token t uses uniforms[b, t]); otherwise ``generator`` feeds ``torch.multinomial``.
    ``decode``: `hf` runs the model's own forward at each token, `lean` rlhf-pg's decode step
    (:mod:`rlhf_pg.decode`, Llama-architecture models; the same arithmetic with less around it).
    """
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    G, P = group_size, len(prompts)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)

    T = params.max_new_tokens
    dec = decoding(decode, model, prompt_ids.shape[1] + T)
    logits = dec.start(prompt_ids, prompt_mask, G)
    B = P * G
    next_pos = prompt_mask.sum(-1, keepdim=True).repeat_interleave(G, 0)  # (B_active, 1): next position
    active = torch.arange(B, device=device)  # rows of the full batch still decoding

    tokens = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    logps = torch.zeros((B, T), dtype=torch.float32, device=device)
    lengths = torch.full((B,), T, dtype=torch.long, device=device)
    stops = [x for x in params.stop if x]

    for t in range(T):
        u = uniforms[active, t] if uniforms is not None else None
        tok, lp = sample_from_logits(logits, params.temperature, params.top_p, params.top_k, generator, u)
        tokens[active, t] = tok
        logps[active, t] = lp
        done = tok == eos_id
        if stops:
            done |= torch.tensor(contains_stop(tokenizer, tokens[active, : t + 1].tolist(), stops), device=device)
        if done.any():
            lengths[active[done]] = t + 1
            keep = (~done).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            active, next_pos, tok = active[keep], next_pos[keep], tok[keep]
            dec.select(keep)
        if t == T - 1:
            break
        logits = dec.feed(tok[:, None], torch.ones_like(next_pos, dtype=torch.bool), next_pos)
        next_pos = next_pos + 1

    return _to_batch(prompt_ids, prompt_mask, tokens, logps, lengths, G, pad_id)


class _HFDecoding:
    """Decoding with the model's own forward and a transformers ``DynamicCache`` (the attention mask
    over the cache's columns kept here: 0 = padding or a hole)."""

    def __init__(self, model, capacity: int):
        self.model = model

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, G: int) -> torch.Tensor:
        """Run each prompt once; repeat its KV cache and last logits for its G samples: (B, V) logits."""
        out = self.model(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=position_ids(prompt_mask),
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache, logits, self.attn = out.cache, out.logits[:, -1], prompt_mask
        if G > 1:
            self.select(torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat_interleave(G))
            logits = logits.repeat_interleave(G, 0)
        return logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep only cache rows ``rows``, in that order."""
        self.cache.batch_select_indices(rows)
        self.attn = self.attn[rows]

    def feed(self, tokens: torch.Tensor, real: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Append (B, n) ``tokens`` at positions ``pos``; ``real`` marks those later tokens attend to.
        The logits of the last column, (B, V)."""
        self.attn = torch.cat([self.attn, real.to(self.attn.dtype)], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self.attn,
            position_ids=pos,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.cache
        return out.logits[:, -1]


class _LeanDecoding(_HFDecoding):
    """The same calls made by :class:`rlhf_pg.decode.LeanDecoder` (its own preallocated cache, grown
    when a feed would overflow it)."""

    def __init__(self, model, capacity: int):
        from .decode import LeanDecoder, matmul_dtype

        self.dec, self.capacity = LeanDecoder(model, matmul_dtype(model)), capacity

    def start(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, G: int) -> torch.Tensor:
        self.dec.start(prompt_ids.shape[0], self.capacity, prompt_ids.device)
        logits = self.dec.feed(prompt_ids, prompt_mask, position_ids(prompt_mask))
        if G > 1:
            self.select(torch.arange(prompt_ids.shape[0], device=prompt_ids.device).repeat_interleave(G))
            logits = logits.repeat_interleave(G, 0)
        return logits

    def select(self, rows: torch.Tensor) -> None:
        self.dec.select(rows)

    def feed(self, tokens: torch.Tensor, real: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.dec.feed(tokens, real, pos)


def decoding(decode: str, model, capacity: int) -> _HFDecoding:
    """The decoding calls of ``rollout.decode`` (`lean` or `hf`) for a cache of ``capacity`` columns."""
    return (_LeanDecoding if decode == "lean" else _HFDecoding)(model, capacity)


def _to_batch(prompt_ids, prompt_mask, tokens, logps, lengths, G: int, pad_id: int) -> Batch:
    """Trim to the longest completion; mask = 1 up to and including EOS / the stop token."""
    T_used = int(lengths.max().item())
    tokens, logps = tokens[:, :T_used], logps[:, :T_used]
    mask = (torch.arange(T_used, device=tokens.device)[None, :] < lengths[:, None]).float()  # (B, T)
    tokens = tokens.masked_fill(mask == 0, pad_id)
    return Batch(
        prompt_ids=prompt_ids.repeat_interleave(G, 0),
        prompt_mask=prompt_mask.repeat_interleave(G, 0),
        completion_ids=tokens,
        completion_mask=mask,
        old_logprobs=logps * mask,
        group_size=G,
    )


NON_REWARD_COLUMNS = ("prompt", "prompt_ids", "prompt_text")
"""Dataset columns that are not passed to reward functions as keyword columns."""


def sample(
    backend,
    tokenizer,
    data,
    rows: list[int],
    group_size: int,
    params: SamplingParams,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    episodes=None,
) -> Batch:
    """The one sampling path (training, evaluation, the labs): ``group_size`` completions for dataset
    ``rows`` (from :mod:`rlhf_pg.data`) by ``backend`` (:mod:`rlhf_pg.backends`), inside the context
    the backend asks for, with the batch's texts and reward columns filled in.

    ``uniforms`` (len(rows)·G, W): the step's sampling uniforms (:func:`rlhf_pg.order.rollout_uniforms`;
    W = max_new_tokens, or max_episode_tokens for episodes); without them the backend draws from
    ``generator``. ``episodes`` (an :class:`rlhf_pg.envs.Episodes`): sample multi-turn episodes with
    an environment instead of single completions."""
    sub = data.select(rows)
    with torch.no_grad():
        if episodes is not None:
            from .envs import sample_episodes

            batch = sample_episodes(backend, tokenizer, episodes, sub, group_size, params, uniforms, generator)
            return attach_rows(batch, sub, tokenizer, group_size, keep_prompts=True)
        with backend.sampling_context():
            batch = backend.generate(
                list(sub["prompt_ids"]), group_size, params, uniforms=uniforms, generator=generator
            )
    return attach_rows(batch, sub, tokenizer, group_size)


@contextmanager
def sampling_mode(model):
    """Eval mode (no dropout) with the KV cache on for sampling; both restored afterwards."""
    config = getattr(model, "config", None)
    was_training, use_cache = model.training, getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = True
    try:
        yield model
    finally:
        if config is not None:
            config.use_cache = use_cache
        model.train(was_training)


def attach_rows(batch: Batch, sub, tokenizer, group_size: int, keep_prompts: bool = False) -> Batch:
    """Fill a sampled batch's prompts, texts, reward columns (each dataset row repeated G times)
    and decoded completions from the dataset rows ``sub`` it was sampled for (``keep_prompts``: the
    batch's own prompts stay, e.g. an environment's first messages)."""
    rep = lambda xs: [x for x in xs for _ in range(group_size)]  # noqa: E731
    if not keep_prompts:
        batch.prompts = rep(sub["prompt"])
        batch.prompt_texts = rep(sub["prompt_text"])
    batch.columns = {c: rep(sub[c]) for c in sub.column_names if c not in NON_REWARD_COLUMNS}
    batch.completions = tokenizer.batch_decode(batch.completion_lists(), skip_special_tokens=True)
    return batch


# ------------------------------------------------------------------------------------- episodes
class EpisodeSession:
    """A batch of episodes being sampled turn by turn (the backend side of :mod:`rlhf_pg.envs`).

    The episode runner drives it in lockstep: :meth:`turn` samples one model turn for every live
    episode, :meth:`keep` drops the episodes that ended, :meth:`extend` appends each remaining
    episode's environment segment. Episodes are numbered 0 … B−1 in the order of the prompts given
    to the backend; every call is about the live ones, in that order."""

    def turn(self, max_tokens: list[int]) -> list[tuple[list[int], list[float]]]:
        """One model turn per live episode: (token ids, their sampler log-probs), cut after EOS, after
        the token that completes a stop string, or at the episode's ``max_tokens``."""
        raise NotImplementedError

    def keep(self, positions: list[int]) -> None:
        """Continue only the live episodes at ``positions`` (indices into the live list)."""
        raise NotImplementedError

    def extend(self, segments: list[list[int]]) -> None:
        """Append context tokens (an environment's segment) to each live episode."""
        raise NotImplementedError


class HFEpisodeSession(EpisodeSession):
    """Episodes on the training module with ONE KV cache carried across turns.

    Each prompt is prefilled once (identical prompts once in all); after that only new tokens are
    fed: the sampled ones and the environment's segments. Episodes advance in lockstep, so the cache
    is one rectangular batch: an episode whose turn ended while others still decode is fed a pad
    token with attention 0 (a *hole*), and segments of different lengths are left-padded with holes
    so every episode's last real token is in the last column (its logits are the next turn's). Holes
    are masked out of attention and skipped by the explicit position ids, so each episode computes
    exactly what a forward over its own compact token sequence computes (tests/test_envs.py checks
    the sampled log-probs against the trainer's forward over the trajectory). Ended episodes leave
    the cache. ``decode`` (``rollout.decode``): the model's forward (`hf`) or :mod:`rlhf_pg.decode`
    (`lean`) makes the calls.

    ``uniforms`` (B, W): episode b's k-th sampled token uses uniforms[b, k] (k counts its actions over
    all turns), so the draws depend only on (seed, step, global row), as in :func:`generate`."""

    def __init__(self, model, tokenizer, prompts, params, uniforms=None, generator=None, decode: str = "hf"):
        self.model, self.tokenizer, self.params = model, tokenizer, params
        self.uniforms, self.generator = uniforms, generator
        self.device = next(model.parameters()).device
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        self.stops = [s for s in params.stop if s]
        keys = [tuple(p) for p in prompts]
        uniq = list(dict.fromkeys(keys))
        inv = torch.tensor([uniq.index(k) for k in keys], device=self.device)
        ids, mask = left_pad([list(k) for k in uniq], self.pad_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.dec = decoding(decode, model, ids.shape[1] + params.max_new_tokens)  # (lean: grows as needed)
        logits = self.dec.start(ids, mask, 1)  # (U, V)
        self.dec.select(inv)  # (U, ...) → (B, ...): one prefill per distinct prompt
        self.logits = logits[inv]  # (B, V): predicts each episode's first token
        self.pos = mask[inv].sum(-1)  # (B,) position of each episode's next real token
        self.live = torch.arange(len(prompts), device=self.device)  # episode ids, in cache order
        self.n_actions = torch.zeros(len(prompts), dtype=torch.long, device=self.device)  # per episode

    def _feed(self, tokens: torch.Tensor, real: torch.Tensor) -> None:
        """Run (n, L) ``tokens`` through the model; ``real`` (n, L) marks real tokens (right-aligned)."""
        real_l = real.long()
        pos = self.pos[:, None] + (real_l.cumsum(1) - 1).clamp(min=0)  # (n, L): holes reuse a position
        last = self.dec.feed(tokens, real, pos)
        fed = real.any(1)  # episodes with at least one real token: their last one is in the last column
        self.logits = torch.where(fed[:, None], last, self.logits)
        self.pos = self.pos + real_l.sum(1)

    def turn(self, max_tokens: list[int]) -> list[tuple[list[int], list[float]]]:
        n, p = self.live.numel(), self.params
        budget = torch.tensor(max_tokens, device=self.device)
        in_turn = budget > 0  # (n,) still sampling this turn
        toks: list[list[int]] = [[] for _ in range(n)]
        lps: list[list[float]] = [[] for _ in range(n)]
        count = torch.zeros(n, dtype=torch.long, device=self.device)
        while bool(in_turn.any()):
            u = None
            if self.uniforms is not None:
                k = self.n_actions[self.live].clamp(max=self.uniforms.shape[1] - 1)
                u = self.uniforms[self.live, k]
            tok, lp = sample_from_logits(self.logits, p.temperature, p.top_p, p.top_k, self.generator, u)
            rows = in_turn.nonzero().squeeze(-1).tolist()
            tl, ll = tok.tolist(), lp.tolist()
            for i in rows:
                toks[i].append(tl[i])
                lps[i].append(ll[i])
            count += in_turn.long()
            self.n_actions[self.live] += in_turn.long()
            ended = (tok == self.eos_id) | (count >= budget)
            if self.stops:
                hit = contains_stop(self.tokenizer, [toks[i] for i in rows], self.stops)
                ended[rows] |= torch.tensor(hit, device=self.device)
            feed = torch.where(in_turn, tok, torch.full_like(tok, self.pad_id))
            self._feed(feed[:, None], in_turn[:, None])  # the turn's last token enters the cache too
            in_turn = in_turn & ~ended
        return list(zip(toks, lps))

    def keep(self, positions: list[int]) -> None:
        if len(positions) == self.live.numel():
            return
        idx = torch.tensor(positions, dtype=torch.long, device=self.device)
        self.live, self.pos, self.logits = self.live[idx], self.pos[idx], self.logits[idx]
        if positions:
            self.dec.select(idx)

    def extend(self, segments: list[list[int]]) -> None:
        if not segments or not any(segments):
            return
        ids, real = left_pad(segments, self.pad_id)  # holes on the left: last real token in the last column
        self._feed(ids.to(self.device), real.to(self.device).bool())
