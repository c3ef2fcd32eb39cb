"""Multi-turn episodes: an environment answers each model turn, and the whole exchange is one trajectory.

The contract (a recipe names the class as ``rollout.env: path/to/env.py:Class`` or
``package.module:Class``, with ``rollout.env_kwargs``)::

    class MyEnv:                                   # one instance per episode: Class(**env_kwargs)
        def reset(self, row: dict, seed: int) -> str | list[dict] | None:
            # row: the dataset row (prompt and every other column). The first messages of the
            # episode (a string is one user message); None = the row's own prompt. ``seed`` is
            # optional (declare it to get it): a number for the episode's own randomness, fixed by
            # (run seed, step, global row), so runs, resumes and N processes see the same episodes.
        def step(self, text: str, token_ids: list[int]) -> EnvStep:
            # the model's turn (decoded text and its token ids, as sampled) → what happens next:
            # EnvStep(observation, reward=None, done=False, info={}). observation: a string (one user
            # message), a list of chat messages, or None (the episode ends).

Either method may be ``async def``: the environments of a batch then run concurrently. ``step`` may
also return a bare observation (``str`` / ``list`` / ``None``) or a tuple ``(observation, reward,
done)``. ``info`` holds numbers summed over the episode and logged as ``episode/<key>`` (the tool
environment counts ``tool_calls`` and ``tool_errors`` there).

Token-in/token-out. The trajectory is the exact token sequence: the model's tokens as sampled, then,
after each turn, the environment's message as a tokenized *segment*: the text the chat template puts
after the model's turn (its end-of-turn marker, the new message, the next assistant header). The
segment is computed once per observation by rendering a probe conversation with and without the new
message (:class:`ChatFormat`), so prompt + turn + segment + turn + ... is token-for-token what the
template renders for the whole conversation (tests/test_envs.py checks it on SmolLM2's template and on
one without a system default). Nothing is ever re-tokenized from decoded text. Without a chat template
(plain-text prompts) an observation string is tokenized and appended as it is.

Masks and rewards. Segment tokens are context: attended to, but with no log-prob, loss, KL or entropy
(``Batch.action_mask`` is 0 on them). A turn's reward sits on the turn's last token; the advantage
estimators then see the actions as consecutive steps (core.ActionIndex), so reward-to-go, GAE and the
group estimators work unchanged. Why masking is right: log P(τ) = Σ log π_θ(a_t|s_t) + Σ log
P_env(o_k|history), and the second sum does not depend on θ, so ∇ log P(τ) has only the action terms
(tests/test_exact_gradients.py measures both the masked estimator and the bias of training on the
environment's tokens).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import user_code
from .data import is_message
from .errors import UserError, one_line

Messages = list[dict[str, Any]]


@dataclass
class EnvStep:
    """What an environment returns after a model turn."""

    observation: str | Messages | None = None
    """The next message(s) the model sees: a string (one user message) or chat messages; None ends the episode."""
    reward: float | None = None
    """This turn's reward, placed on the turn's last token (None = 0)."""
    done: bool = False
    """The episode ends after this turn (the observation, if any, is not shown)."""
    info: dict[str, float] = field(default_factory=dict)
    """Numbers summed over the episode and logged as ``episode/<key>`` (e.g. tool_calls)."""


class Environment:
    """A base class for environments (optional: any class with ``reset`` and ``step`` works)."""

    def reset(self, row: dict[str, Any], seed: int | None = None) -> str | Messages | None:
        """The episode's first messages for dataset ``row``; None = the row's prompt. ``seed``: for the
        episode's own randomness (see the module docstring)."""
        return None

    def step(self, text: str, token_ids: list[int]) -> EnvStep:  # pragma: no cover - documentation
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ loading
def load_environment(ref: str, kwargs: dict[str, Any] | None = None) -> Callable[[], Any]:
    """``rollout.env`` → a factory of fresh environments (``Class(**env_kwargs)``), checked now:
    importable, a class (or factory) with ``reset`` and ``step``, and constructible with the kwargs."""
    what = f"environment {ref!r}"
    obj = user_code.load_callable(ref, what, "a class with reset(row) and step(text, token_ids)")
    kwargs = dict(kwargs or {})

    def make() -> Any:
        try:
            env = obj(**kwargs)
        except UserError:
            raise
        except Exception as exc:
            raise UserError(
                f"creating {what} with rollout.env_kwargs={kwargs} raised {type(exc).__name__}: {one_line(exc)} "
                "— fix rollout.env_kwargs or the class"
            ) from exc
        missing = [m for m in ("reset", "step") if not callable(getattr(env, m, None))]
        if missing:
            raise UserError(
                f"{what} has no {' or '.join(missing)} method — an environment needs reset(row) and "
                "step(text, token_ids) (see rlhf_pg/envs.py)"
            )
        return env

    make()  # fail now, before any model is loaded
    make.name = ref  # type: ignore[attr-defined]
    return make


# ------------------------------------------------------------------------------- checking results
def as_env_step(raw: Any, name: str, turn: int) -> EnvStep:
    """Normalise what ``step`` returned; a wrong type is a one-line error naming the turn and the fix."""
    where = f"environment {name!r} step() at turn {turn + 1}"
    if isinstance(raw, EnvStep):
        step = raw
    elif raw is None or isinstance(raw, (str, list)):
        step = EnvStep(observation=raw)
    elif isinstance(raw, tuple) and len(raw) == 3:
        step = EnvStep(observation=raw[0], reward=raw[1], done=bool(raw[2]))
    else:
        raise UserError(
            f"{where} returned a {type(raw).__name__}; return EnvStep(observation, reward, done), a tuple "
            "(observation, reward, done), a string, a list of messages or None"
        )
    check_observation(step.observation, where)
    if step.reward is not None:
        if isinstance(step.reward, bool) or not isinstance(step.reward, numbers.Real):
            raise UserError(f"{where} returned reward {step.reward!r}; a reward is a number or None")
        if not math.isfinite(float(step.reward)):
            raise UserError(f"{where} returned reward {step.reward!r}; a reward must be finite")
    if not isinstance(step.info, dict) or not all(
        isinstance(k, str) and isinstance(v, numbers.Real) for k, v in step.info.items()
    ):
        raise UserError(f"{where} returned info {step.info!r}; info maps names to numbers")
    return step


def check_observation(obs: Any, where: str) -> None:
    """An observation is None, a string or a non-empty list of {"role": str, "content": str} messages."""
    if obs is None or isinstance(obs, str):
        return
    if isinstance(obs, list) and obs and all(is_message(m) for m in obs):
        return
    raise UserError(
        f"{where} returned observation {preview(obs)}; an observation is a string, a list of "
        '{"role": ..., "content": ...} messages, or None to end the episode'
    )


def as_messages(obs: str | Messages, role: str = "user") -> Messages:
    return [{"role": role, "content": obs}] if isinstance(obs, str) else [dict(m) for m in obs]


def preview(x: Any, limit: int = 80) -> str:
    """``repr(x)`` cut to ``limit`` characters, for quoting a user's value in a one-line error."""
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------- calling environments
def call_all(
    calls: Sequence[Callable[[], Any]], errors: Sequence[str], timeout_s: float | None = None, is_async: bool = False
) -> list[Any]:
    """Run ``calls`` (each returns a value or a coroutine); coroutines run concurrently. An exception
    becomes a one-line UserError naming ``errors[i]`` (what was called). With ``timeout_s`` a call that
    overruns is a one-line error too: a synchronous one (``is_async`` False) runs in a thread that is
    abandoned when it overruns; coroutines are awaited under ``asyncio.wait_for`` (cancelled)."""
    results: list[Any] = []
    for call, what in zip(calls, errors):
        if timeout_s is not None and not is_async:
            ok, value = user_code.call_in_thread(call, {}, timeout_s, "env")
            if ok is None:
                raise _overran(what, timeout_s)
            if not ok:
                if isinstance(value, UserError):
                    raise value
                raise _raised(what, value) from value
            results.append(value)
            continue
        try:
            results.append(call())
        except UserError:
            raise
        except Exception as exc:
            raise _raised(what, exc) from exc
    pending = [i for i, r in enumerate(results) if inspect.isawaitable(r)]
    if pending:
        coros = [results[i] if timeout_s is None else asyncio.wait_for(results[i], timeout_s) for i in pending]
        done = user_code.run_coroutines(coros)
        for i, r in zip(pending, done):
            if isinstance(r, UserError):
                raise r
            if isinstance(r, asyncio.TimeoutError) and timeout_s is not None:
                raise _overran(errors[i], timeout_s)
            if isinstance(r, BaseException):
                raise _raised(errors[i], r) from r
            results[i] = r
    return results


def _overran(what: str, timeout_s: float) -> UserError:
    return UserError(
        f"{what} did not return within rollout.env_timeout_s={timeout_s:g} s — make it faster or raise the timeout"
    )


def _raised(what: str, exc: BaseException) -> UserError:
    return UserError(f"{what} raised {type(exc).__name__}: {one_line(exc)} — fix the environment")


# ---------------------------------------------------------------------------------- chat segments
PROBE = "\u2063PROBE\u2063"
"""Placeholder content for the probe renders (no template trims or rewrites it)."""


class ChatFormat:
    """Token segments of observations, so the concatenated trajectory equals the template's rendering.

    ``chat`` False (plain-text prompts): an observation string is tokenized as it is; messages are
    an error. ``chat`` True: for observation messages M, render the probe conversation
    C = [user: PROBE, assistant: PROBE] without and C + M with the generation prompt; the segment is
    what the template writes after the assistant's content (its end-of-turn text, minus the EOS token
    when the model sampled it) followed by the difference of the two renders. Templates whose
    rendering of earlier messages changes when messages are appended (not "append-only") are refused."""

    def __init__(self, tokenizer, chat: bool):
        self.tokenizer, self.chat = tokenizer, chat
        self.eos_id = tokenizer.eos_token_id
        if chat:
            base = [{"role": "user", "content": PROBE}, {"role": "assistant", "content": PROBE}]
            text = self._render(base, False)
            if text.count(PROBE) != 2:
                raise UserError(
                    "the tokenizer's chat template does not render message contents verbatim — "
                    "multi-turn rollouts need a template that does"
                )
            self.base = base
            self.base_text = text
            self.closing = text[text.rindex(PROBE) + len(PROBE) :]
            """What the template writes after an assistant message's content (e.g. '<|im_end|>\\n')."""
            eos = tokenizer.decode([self.eos_id]) if self.eos_id is not None else ""
            self.closing_after_eos = self.closing[len(eos) :] if eos and self.closing.startswith(eos) else self.closing

    def _render(self, messages: Messages, generation_prompt: bool) -> str:
        try:
            return str(
                self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
            )
        except Exception as err:  # jinja errors, unsupported roles
            raise UserError(
                f"the chat template failed on an episode's messages ({one_line(err)}) — check the roles the "
                "environment uses against the model's template"
            ) from err

    def first_prompt(self, messages: Messages) -> str:
        """The rendered text of an episode's first messages, ending with the assistant header."""
        return self._render(messages, True)

    def segment_text(self, obs: str | Messages, ended_with_eos: bool) -> str:
        """The text appended after a model turn for observation ``obs``."""
        if not self.chat:
            if not isinstance(obs, str):
                raise UserError(
                    "an environment returned chat messages but the prompts are plain text — return a string, "
                    "or use conversational prompts"
                )
            return obs
        longer = self._render(self.base + as_messages(obs), True)
        if not longer.startswith(self.base_text):
            raise UserError(
                "the chat template is not append-only: adding a message changes how earlier ones render, so a "
                "multi-turn trajectory cannot be built token by token — use a template that renders each "
                "message independently"
            )
        closing = self.closing_after_eos if ended_with_eos else self.closing
        return closing + longer[len(self.base_text) :]

    def segment(self, obs: str | Messages, ended_with_eos: bool) -> list[int]:
        """Token ids of :meth:`segment_text` (no special tokens added)."""
        return list(self.tokenizer(self.segment_text(obs, ended_with_eos), add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------ the runner
@dataclass
class Episodes:
    """How a run samples episodes (built by setup.build_episodes from the ``rollout`` section)."""

    make_env: Callable[[], Any]
    """A fresh environment per episode."""
    name: str
    """What the recipe called it (for messages)."""
    chat: ChatFormat
    max_turns: int = 4
    max_episode_tokens: int = 512
    """Tokens after the prompt (model and environment turns together)."""
    system_prompt: str | None = None
    """data.system_prompt, applied to the first messages an environment gives."""
    max_prompt_tokens: int | None = None
    timeout_s: float | None = None
    """rollout.env_timeout_s: a reset or step that overruns stops the run with one line."""
    stat_keys: tuple[str, ...] = ("turns", "env_tokens", "truncated")
    """The per-episode counts logged as ``episode/<key>``: these, plus the environment class's
    ``info_keys`` (the same on every process, so they can be reduced)."""


@dataclass
class _Episode:
    env: Any
    row: dict[str, Any]
    ids: list[int] = field(default_factory=list)
    """Every token after the prompt, in order."""
    action: list[bool] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    rewards: list[tuple[int, float]] = field(default_factory=list)
    """(position of a turn's last token, the environment's reward for the turn)."""
    messages: Messages = field(default_factory=list)
    turns: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    def add(self, ids: list[int], action: bool, logps: list[float] | None = None) -> None:
        self.ids += ids
        self.action += [action] * len(ids)
        self.logps += logps if logps is not None else [0.0] * len(ids)


def sample_episodes(backend, tokenizer, spec: Episodes, sub, group_size: int, params, uniforms=None, generator=None):
    """Sample ``group_size`` episodes for each dataset row of ``sub`` (a datasets.Dataset from
    :mod:`rlhf_pg.data`) with ``backend``; returns the :class:`~rlhf_pg.batch.Batch` (one row per
    episode; rows i·G … i·G+G−1 come from row i) with the masks, per-turn rewards and texts filled.

    Per turn: the backend samples a turn for every live episode (at most ``rollout.max_new_tokens``
    tokens and what is left of ``max_episode_tokens``), every environment steps on its turn (async
    ones concurrently), and episodes that go on get their observation's segment appended. An
    episode ends when its environment says so (observation None or ``done``), after ``max_turns``
    turns, or when the next observation and at least one more model token would not fit in
    ``max_episode_tokens`` (that observation is then not shown; ``episode/truncated`` counts it)."""
    from .batch import Batch
    from .data import render_prompt
    from .rollout import left_pad

    G = group_size
    skip = ("prompt_ids", "prompt_text")
    rows = [{k: v for k, v in r.items() if k not in skip} for r in sub.to_list()]
    eps = [_Episode(env=spec.make_env(), row=rows[i // G]) for i in range(len(rows) * G)]
    seeds = episode_seeds(uniforms, len(eps))
    firsts = call_all(
        [
            (lambda e=e, s=s: e.env.reset(e.row, seed=s) if _takes_seed(e.env.reset) else e.env.reset(e.row))
            for e, s in zip(eps, seeds)
        ],
        [f"environment {spec.name!r} reset() (dataset row {i // G})" for i in range(len(eps))],
        spec.timeout_s,
        inspect.iscoroutinefunction(eps[0].env.reset) if eps else False,
    )
    prompts, prompt_texts, prompt_ids = [], [], []
    for i, first in enumerate(firsts):
        check_observation(first, f"environment {spec.name!r} reset() (dataset row {i // G})")
        if first is None:
            prompts.append(sub[i // G]["prompt"])
            prompt_texts.append(sub[i // G]["prompt_text"])
            prompt_ids.append(list(sub[i // G]["prompt_ids"]))
            continue
        prompt = as_messages(first) if spec.chat.chat else first
        if spec.system_prompt and isinstance(prompt, list) and prompt[0]["role"] == "system":
            # data.system_prompt goes first, also when the environment writes its own system message
            prompt = [{"role": "system", "content": f"{spec.system_prompt}\n\n{prompt[0]['content']}"}, *prompt[1:]]
        text = render_prompt(prompt, i // G, tokenizer, spec.system_prompt)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if spec.max_prompt_tokens is not None:
            ids = ids[-spec.max_prompt_tokens :]
        prompts.append(prompt)
        prompt_texts.append(text)
        prompt_ids.append(ids)

    eos = tokenizer.eos_token_id
    with backend.sampling_context(), backend.episodes(prompt_ids, params, uniforms, generator) as session:
        live = list(range(len(eps)))
        for turn in range(spec.max_turns):
            budget = [min(params.max_new_tokens, spec.max_episode_tokens - len(eps[e].ids)) for e in live]
            results = session.turn(budget)
            texts = tokenizer.batch_decode([ids for ids, _ in results], skip_special_tokens=True)
            for e, (ids, lps), text in zip(live, results, texts):
                ep = eps[e]
                ep.add(ids, True, lps)
                ep.turns.append(text)
                ep.messages.append({"role": "assistant", "content": text})
                ep.stats["turns"] = ep.stats.get("turns", 0) + 1
            raw = call_all(
                [(lambda e=e, r=r: eps[e].env.step(r[0], list(r[1][0]))) for e, r in zip(live, zip(texts, results))],
                [f"environment {spec.name!r} step() at turn {turn + 1}" for _ in live],
                spec.timeout_s,
                inspect.iscoroutinefunction(eps[0].env.step),
            )
            going, segments = [], []
            for pos, (e, r, (ids, _)) in enumerate(zip(live, raw, results)):
                ep, step = eps[e], as_env_step(r, spec.name, turn)
                if step.reward is not None and ep.ids:
                    ep.rewards.append((len(ep.ids) - 1, float(step.reward)))
                for k, v in step.info.items():
                    ep.stats[k] = ep.stats.get(k, 0) + float(v)
                if step.done or step.observation is None:
                    continue
                if turn == spec.max_turns - 1:
                    ep.stats["truncated"] = 1
                    continue
                seg = spec.chat.segment(step.observation, ended_with_eos=bool(ids) and ids[-1] == eos)
                if len(ep.ids) + len(seg) + 1 > spec.max_episode_tokens:
                    ep.stats["truncated"] = 1
                    continue
                ep.add(seg, False)
                ep.messages += as_messages(step.observation)
                ep.stats["env_tokens"] = ep.stats.get("env_tokens", 0) + len(seg)
                going.append(pos)
                segments.append(seg)
            session.keep(going)
            live = [live[p] for p in going]
            if not live:
                break
            session.extend(segments)

    B, T = len(eps), max(max((len(e.ids) for e in eps), default=0), 1)
    ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
    real, act, logps, env_r = (torch.zeros(B, T) for _ in range(4))
    for b, ep in enumerate(eps):
        n = len(ep.ids)
        if n:
            ids[b, :n] = torch.tensor(ep.ids)
            real[b, :n] = 1
            act[b, :n] = torch.tensor(ep.action, dtype=torch.float)
            logps[b, :n] = torch.tensor(ep.logps)
        for t, r in ep.rewards:
            env_r[b, t] += r
    p_ids, p_mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    device = backend_device(backend)
    keys = sorted(set(spec.stat_keys))
    batch = Batch(
        prompt_ids=p_ids.to(device),
        prompt_mask=p_mask.to(device),
        completion_ids=ids.to(device),
        completion_mask=real.to(device),
        old_logprobs=(logps * act).to(device),
        group_size=G,
        action_mask=act.to(device),
        env_rewards=env_r.to(device),
        messages=[ep.messages for ep in eps],
        turns=[ep.turns for ep in eps],
        episode_stats={k: torch.tensor([ep.stats.get(k, 0.0) for ep in eps], device=device) for k in keys},
    )
    batch.prompts, batch.prompt_texts = prompts, prompt_texts
    return batch


def episode_seeds(uniforms, n: int) -> list[int]:
    """One seed per episode for its environment's randomness: from the episode's row of the trainer's
    uniforms (a function of run seed, step and global row, so independent of the process count), or
    its position in the batch without them (evaluation)."""
    if uniforms is None:
        return list(range(n))
    return [int(x * (2**31 - 1)) ^ 0x5BD1E995 for x in uniforms[:, 0].double().cpu().tolist()]


def _takes_seed(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "seed" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def backend_device(backend) -> torch.device:
    """Where the trainer wants the batch: the backend's model's device (CPU without one)."""
    model = getattr(backend, "model", None)
    if model is not None:
        return next(model.parameters()).device
    return torch.device(getattr(backend, "device", "cpu"))
