"""The one object that carries a rollout through an RL step.

B = number of completions on this process = prompts × G (the G samples of a prompt are adjacent rows
and always live on the same process, so group statistics need no communication).
P = prompt length (left-padded), T = completion length (right-padded after EOS).

Two masks over the completion positions, which differ only for multi-turn episodes:
``completion_mask`` says which positions hold real tokens (attended to), ``action_mask`` which of them
the policy sampled (they get a log-prob, a loss, a KL and an entropy). Environment and tool tokens
between model turns are real but not actions. Single-turn batches have action_mask == completion_mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch


@dataclass
class Batch:
    # --- filled by the rollout engine -------------------------------------------------------------
    prompt_ids: torch.Tensor
    """(B, P) long. Prompt tokens, left-padded with the pad id."""
    prompt_mask: torch.Tensor
    """(B, P) long. 1 on real prompt tokens, 0 on left padding."""
    completion_ids: torch.Tensor
    """(B, T) long. Sampled tokens a_t; pad id after EOS / stop."""
    completion_mask: torch.Tensor
    """(B, T) float. 1 on real tokens (attention): up to and including EOS (or the stop string's last token);
    in an episode also on the environment's tokens between turns. 0 on right padding."""
    old_logprobs: torch.Tensor
    """(B, T) float. log π_old(a_t|s_t) of the sampled tokens under the sampling policy (τ applied), 0 on padding."""
    group_size: int
    """G: completions per prompt; rows [i·G, (i+1)·G) share a prompt."""

    action_mask: torch.Tensor | None = None
    """(B, T) float. 1 on the tokens the policy sampled (a_t); defaults to ``completion_mask``. 0 on
    environment/tool tokens of an episode, which are context: no log-prob, loss, KL or entropy."""

    # --- episodes (multi-turn rollouts; see envs.py) -----------------------------------------------
    env_rewards: torch.Tensor | None = None
    """(B, T) float. The environment's per-turn rewards, each on the last action token of its turn."""
    messages: list[list[dict]] = field(default_factory=list)
    """Per row, the episode after the prompt as chat messages (assistant turns and observations)."""
    turns: list[list[str]] = field(default_factory=list)
    """Per row, the text of each model turn."""
    episode_stats: dict[str, torch.Tensor] = field(default_factory=dict)
    """name → (B,) float per-episode counts (turns, tool_calls, tool_errors, env_tokens, ...)."""

    # --- texts and dataset columns (filled by the trainer) -----------------------------------------
    prompts: list[Any] = field(default_factory=list)
    """Original prompts (str or chat messages), one per row (repeated G times)."""
    prompt_texts: list[str] = field(default_factory=list)
    """Prompts as the model saw them (chat template applied), one per row."""
    completions: list[str] = field(default_factory=list)
    """Decoded completions (special tokens removed)."""
    columns: dict[str, list] = field(default_factory=dict)
    """Other dataset columns (e.g. `answer`), one entry per row, passed to reward functions."""

    # --- filled by rewards / reference / value passes / advantage estimator -----------------------
    scores: torch.Tensor | None = None
    """(B,) float. Weighted sequence reward R(x, y) from the reward functions; in an episode plus the
    environment's per-turn rewards (the episode's total reward)."""
    reward_per_function: dict[str, torch.Tensor] = field(default_factory=dict)
    """name → (B,) float. Each reward function's own sequence value (unweighted), NaN where it returned None."""
    reward_extra: dict[str, list] = field(default_factory=dict)
    """column → one value per row: what reward functions logged with ``log_extra`` (written to samples.jsonl)."""
    token_rewards: torch.Tensor | None = None
    """(B, T) float. r_t: per-token reward (scores on the last token, dense rewards, − β·KL if kl_in=reward)."""
    ref_logprobs: torch.Tensor | None = None
    """(B, T) float. log π_ref(a_t|s_t); None when β = 0 (no reference model)."""
    values: torch.Tensor | None = None
    """(B, T) float. V(s_t) from the value model at rollout time; None unless the estimator needs values."""
    baseline: torch.Tensor | None = None
    """(B, T) float. b_t the advantage estimator subtracted from the return (group mean, leave-one-out,
    EMA, V(s_t)); None for estimators without one."""
    advantages: torch.Tensor | None = None
    """(B, T) float. Â_t from the advantage estimator."""
    returns: torch.Tensor | None = None
    """(B, T) float. Return targets (value-function targets for gae)."""
    sampler_logprobs: torch.Tensor | None = None
    """(B, T) float. log μ(a_t|s_t) under the engine that sampled (vLLM), kept when ``old_logprobs`` are
    recomputed with the trainer's model; None when the trainer's own model sampled (then μ = π_old)."""
    is_weights: torch.Tensor | None = None
    """(B, T) float. Importance weights π_old/μ of the policy loss (rollout.is_correction); None = 1."""

    def __post_init__(self) -> None:
        if self.action_mask is None:
            self.action_mask = self.completion_mask

    @property
    def size(self) -> int:
        return self.completion_ids.shape[0]

    def completion_lists(self) -> list[list[int]]:
        """Each completion's token ids without padding (what reward functions receive); for an
        episode, every token after the prompt (model and environment turns)."""
        return [row[m.bool()].tolist() for row, m in zip(self.completion_ids.cpu(), self.completion_mask.cpu())]

    def select(self, idx: torch.Tensor) -> Batch:
        """Rows ``idx`` of every per-row field (tensors, lists, columns, per-function rewards)."""
        out: dict[str, Any] = {}
        ilist = idx.tolist()
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = v[idx]
            elif isinstance(v, list):
                out[f.name] = [v[i] for i in ilist] if v else []
            elif isinstance(v, dict):
                out[f.name] = {
                    k: col[idx] if isinstance(col, torch.Tensor) else [col[i] for i in ilist] for k, col in v.items()
                }
            else:
                out[f.name] = v
        return Batch(**out)
