"""Reward functions: the contract, the built-ins, loading user functions, and batched scoring.

The contract is TRL's: every function is called by keyword, so reward functions written for TRL work
unchanged::

    def my_reward(completions, **kwargs) -> list[float | None]:
        ...

    fn(prompts=..., completions=..., completion_ids=..., **dataset_columns,
       trainer_state=..., log_extra=..., log_metric=..., prompt_text=..., turns=..., completion_tokens=...)

* ``prompts`` are the dataset's original prompts (a string or a list of chat messages each);
  ``completions`` the generated completions, one per sample (a prompt sampled ``group_size`` times
  appears ``group_size`` times): strings for text data, ``[{"role": "assistant", "content": text}]``
  for conversational data (prompts given as messages), as TRL passes them.
* Every other dataset column (e.g. ``answer``) arrives as a keyword list of the same length, and so
  do ``completion_ids`` (each completion's token ids, without padding). ``trainer_state`` is a
  ``transformers.TrainerState`` (``global_step``: RL steps done); ``log_extra(column, values)`` adds
  per-sample values to samples.jsonl and ``log_metric(name, value)`` a scalar to metrics.jsonl. Ours
  besides: ``prompt_text`` (each prompt as the model saw it, chat template applied), ``turns`` (each
  completion's model turns as texts: one for a single completion, several in a multi-turn episode)
  and, when the :class:`RewardSet` has a ``tokenizer``, ``completion_tokens`` (each completion token
  decoded alone).
* Multi-turn episodes (``rollout.env``/``rollout.tools``): for conversational data ``completions`` are
  the whole exchange after the prompt as messages (assistant turns, tool and user observations);
  ``completion_ids`` are all its tokens (model and environment).
* A function takes what it needs and ``**kwargs`` for the rest; one without ``**kwargs`` gets only the
  keywords it names. ``async def`` functions are awaited (concurrently).
* It returns one entry per completion: a number (a sequence-level reward), ``None`` ("does not
  apply to this sample"), or a list of numbers aligned with that completion's tokens (a dense,
  per-token reward; its sequence-level value is the sum).
* Options from the recipe (``rewards.functions[i].kwargs``) are bound as keyword arguments with
  :func:`functools.partial`. A class (or a registry entry marked ``factory=True``) is instead
  instantiated with those options, and the instance is called per batch: use this for stateful
  scorers such as a reward model.

A function is named by a built-in's registry name (:data:`REWARD_REGISTRY`), by
``package.module:function`` or by ``path/to/file.py:function`` (relative to the current directory);
see :func:`load_reward_function`. :class:`RewardSet` calls every configured function once per batch
and returns weighted sequence scores, per-function values for logging, and per-token rewards.
"""

from __future__ import annotations

import asyncio
import copy
import difflib
import functools
import inspect
import logging
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_args

import torch

from . import user_code
from .config import OnAllNone, OnError, OnNonfinite
from .errors import UserError, one_line

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list]
_F = TypeVar("_F", bound=Callable[..., Any])

REWARD_REGISTRY: dict[str, Callable[..., Any]] = {}
"""Built-in reward functions (and factories) by name; add entries with :func:`register_reward`."""

TRL_KEYWORDS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
"""What TRL passes every reward function (besides the dataset columns)."""
OWN_KEYWORDS = ("prompt_text", "turns", "completion_tokens")
"""What rlhf-pg passes besides."""
RESERVED_KEYWORDS = TRL_KEYWORDS + OWN_KEYWORDS
"""Keywords the toolkit passes itself; a dataset column may not use these names."""

_FACTORY_ATTR = "_rlhf_pg_reward_factory"


def register_reward(name: str, *, factory: bool = False) -> Callable[[_F], _F]:
    """Decorator registering a reward function under ``name`` in :data:`REWARD_REGISTRY`.

    With ``factory=True`` the decorated callable builds the reward function from the recipe's
    ``kwargs`` (called once, when the :class:`RewardSet` is built) instead of receiving them on
    every call.
    """

    def decorator(fn: _F) -> _F:
        if name in REWARD_REGISTRY:
            raise ValueError(f"reward function {name!r} is already registered")
        if factory:
            setattr(fn, _FACTORY_ATTR, True)
        REWARD_REGISTRY[name] = fn
        return fn

    return decorator


def _is_factory(obj: Any) -> bool:
    return isinstance(obj, type) or getattr(obj, _FACTORY_ATTR, False)


# --------------------------------------------------------------------------------------------
# Loading


def load_reward_function(ref: str) -> Callable[..., Any]:
    """Resolve ``ref`` to a callable, importing only what it names.

    ``ref`` is a registry name (``accuracy``), ``package.module:function`` (imported with
    :func:`importlib.import_module`, so the module must be installed or on ``PYTHONPATH``), or
    ``path/to/file.py:function`` (a file path relative to the current directory, or absolute; the
    file is loaded as a fresh module each time). Every failure is a one-line :class:`UserError`.
    """
    if ":" not in ref:
        if ref in REWARD_REGISTRY:
            return REWARD_REGISTRY[ref]
        close = difflib.get_close_matches(ref, list(REWARD_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"unknown reward function {ref!r}{hint}; built-ins: {', '.join(sorted(REWARD_REGISTRY))}; "
            "or name your own as 'package.module:function' or 'path/to/file.py:function'"
        )
    return user_code.load_callable(ref, f"reward function {ref!r}", "a function fn(prompts, completions, **kwargs)")


# --------------------------------------------------------------------------------------------
# Scoring a batch


@dataclass
class RewardSpec:
    """One configured reward: what to load, its weight in the sum, and options bound to it."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardOutput:
    """The rewards of one batch of ``B`` completions (at most ``T`` tokens each).

    ``scores``: ``(B,)`` float32, the weighted sum over functions of each one's sequence-level value
    (``None`` counts as 0). ``per_function``: display name -> ``(B,)`` float32 sequence-level value
    (the token sum for dense rewards), NaN where the function returned ``None``. ``token_rewards``:
    ``(B, T)`` float32 weighted per-token rewards with ``T`` the longest completion (at least 1), or
    ``None`` when every function returned scalars; a scalar sits on the completion's last real token
    (index 0 for an empty completion), a dense list on its own tokens. ``token_rewards.sum(-1)``
    equals ``scores``.
    """

    scores: torch.Tensor
    per_function: dict[str, torch.Tensor]
    token_rewards: torch.Tensor | None
    extra_columns: dict[str, list] = field(default_factory=dict)
    """Per-sample values the functions logged with ``log_extra(column, values)`` (written to samples.jsonl)."""
    logged_metrics: dict[str, list[float]] = field(default_factory=dict)
    """Scalars the functions logged with ``log_metric(name, value)`` (their mean goes to metrics.jsonl)."""


Value = float | list[float] | None


class RewardSet:
    """The configured reward functions, called once per batch each and combined with weights.

    Policies (recipe keys ``rewards.on_error``, ``rewards.on_nonfinite``, ``rewards.on_all_none``):

    * ``on_error``: a function raises — ``"raise"`` stops with its message; ``"zero"`` treats its
      values for that batch as ``None`` (logged once per function).
    * ``on_nonfinite``: a function returns NaN, inf or a non-number — ``"raise"``, ``"zero"`` (use 0)
      or ``"none"`` (the sample's value becomes ``None``).
    * ``on_all_none``: every function returns ``None`` for a sample — ``"raise"`` or ``"zero"``
      (score 0).

    A function that returns something other than one entry per completion, or a dense list whose
    length is not the completion's token count, always raises. ``tokenizer`` (optional) is used only
    to decode each completion token for the ``completion_tokens`` keyword.
    """

    def __init__(
        self,
        specs: list[RewardSpec],
        on_error: OnError = "raise",
        on_nonfinite: OnNonfinite = "raise",
        on_all_none: OnAllNone = "raise",
        tokenizer: Any = None,
        allow_empty: bool = False,
        timeout_s: float | None = None,
    ) -> None:
        for key, value, kind in (
            ("on_error", on_error, OnError),
            ("on_nonfinite", on_nonfinite, OnNonfinite),
            ("on_all_none", on_all_none, OnAllNone),
        ):
            if value not in get_args(kind):
                raise UserError(f"rewards.{key}={value!r} is not one of {', '.join(get_args(kind))}")
        if not specs and not allow_empty:
            raise UserError("no reward functions configured — add at least one entry to rewards.functions")
        self.on_error = on_error
        self.on_nonfinite = on_nonfinite
        self.on_all_none = on_all_none
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.names: list[str] = []
        self.weights: list[float] = []
        self.functions: list[RewardFn] = []
        seen: dict[str, int] = {}
        for spec in specs:
            base = spec.name.rsplit(":", 1)[-1]
            seen[base] = seen.get(base, 0) + 1
            self.names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
            if not isinstance(spec.weight, numbers.Real) or not math.isfinite(spec.weight):
                raise UserError(f"reward function {spec.name!r} has weight {spec.weight!r} — use a finite number")
            self.weights.append(float(spec.weight))
            self.functions.append(_build(spec))
        self._warned: set[str] = set()

    def __call__(
        self,
        prompts: list,
        completions: list[str],
        completion_ids: list[list[int]],
        columns: dict[str, list],
        prompt_text: list[str] | None = None,
        trainer_state: Any = None,
        conversations: list[list[dict]] | None = None,
        turns: list[list[str]] | None = None,
    ) -> RewardOutput:
        """Score a batch: call every function by keyword, as TRL does (see the module docstring).

        ``completions`` are the decoded texts; for conversational prompts (lists of messages) the
        functions receive each as ``[{"role": "assistant", "content": text}]``. ``columns`` holds the
        extra dataset columns (each a list of length ``B``). ``prompt_text`` is each prompt as rendered
        for the model; it defaults to ``prompts`` when these are all strings and must be given for chat
        prompts. ``trainer_state`` (a ``transformers.TrainerState``) reaches functions that ask for it.
        """
        n = len(completions)
        if len(prompts) != n or len(completion_ids) != n:
            raise ValueError(f"{len(prompts)} prompts, {n} completions, {len(completion_ids)} completion_ids")
        for key, values in columns.items():
            if key in RESERVED_KEYWORDS:
                raise UserError(
                    f"dataset column {key!r} clashes with a keyword reward functions receive — rename the column"
                )
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} values for {n} completions")
        if prompt_text is None:
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt_text is required when prompts are chat messages")
            prompt_text = list(prompts)
        log = _Log(n)
        chat = bool(prompts) and not isinstance(prompts[0], str)
        keywords: dict[str, Any] = dict(
            prompts=prompts,
            completions=(
                conversations
                if chat and conversations
                else [[{"role": "assistant", "content": c}] for c in completions]
                if chat
                else completions
            ),
            completion_ids=completion_ids,
            **columns,
            trainer_state=trainer_state,
            log_extra=log.extra,
            log_metric=log.metric,
            prompt_text=prompt_text,
            turns=turns if turns else [[c] for c in completions],
        )
        if not self.functions:  # an environment's own rewards are the only ones
            return RewardOutput(torch.zeros(n), {}, None)
        if self.tokenizer is not None:
            keywords["completion_tokens"] = self._decode_tokens(completion_ids)
        raws = [self._invoke(name, fn, keywords, n) for name, fn in zip(self.names, self.functions)]
        pending = [i for i, raw in enumerate(raws) if inspect.isawaitable(raw)]
        done = user_code.run_coroutines([raws[i] for i in pending])  # async functions run together
        for i, raw in zip(pending, done):
            raws[i] = self._failed(self.names[i], raw, n) if isinstance(raw, BaseException) else raw
        lengths = [len(ids) for ids in completion_ids]
        results = [self._checked(name, raw, lengths) for name, raw in zip(self.names, raws)]
        for i in range(n):
            if all(values[i] is None for values in results) and self.on_all_none == "raise":
                raise UserError(
                    f"every reward function returned None for sample {i} (prompt {_preview(prompts[i])}) — make "
                    "at least one reward apply to every sample, or set rewards.on_all_none=zero"
                )
        out = self._combine(results, lengths)
        out.extra_columns, out.logged_metrics = log.columns, log.metrics
        return out

    def check_keywords(self, columns: Sequence[str], data: str | None = None) -> None:
        """Fail fast (before any sampling) when a function needs a keyword the data will not provide;
        ``data`` names the dataset in the message (e.g. "eval data 'x.jsonl'")."""
        names = [*TRL_KEYWORDS, *columns, *OWN_KEYWORDS]
        if self.tokenizer is None:
            names.remove("completion_tokens")
        for name, fn in zip(self.names, self.functions):
            try:
                _keywords_for(name, fn, dict.fromkeys(names))
            except UserError as e:
                raise UserError(f"{data}: {e}" if data else str(e)) from None

    def _decode_tokens(self, completion_ids: list[list[int]]) -> list[list[str]]:
        flat = self.tokenizer.batch_decode([[t] for ids in completion_ids for t in ids])
        out, start = [], 0
        for ids in completion_ids:
            out.append(flat[start : start + len(ids)])
            start += len(ids)
        return out

    def _invoke(self, name: str, fn: RewardFn, keywords: dict[str, Any], n: int) -> Any:
        """Call ``fn`` by keyword with what it accepts: its result, an awaitable (async), or Nones.

        Each function gets its own copy of the data (a function that edits its inputs cannot change the
        batch or what the next function sees); with ``timeout_s`` a synchronous function runs in a
        thread that is waited on that long (an async one is awaited under ``asyncio.wait_for``)."""
        kw = {
            k: v if callable(v) or k == "trainer_state" else copy.deepcopy(v)
            for k, v in _keywords_for(name, fn, keywords).items()
        }
        if self.timeout_s is not None and not inspect.iscoroutinefunction(getattr(fn, "func", fn)):
            ok, value = user_code.call_in_thread(fn, kw, self.timeout_s, f"reward-{name}")
            if ok is None:
                return self._failed(
                    name, RewardTimeout(f"did not return within rewards.timeout_s={self.timeout_s:g} s"), n
                )
            if ok:
                return value
            return self._failed(name, value, n)
        try:
            out = fn(**kw)
        except UserError:
            raise
        except Exception as exc:
            return self._failed(name, exc, n)
        if self.timeout_s is not None and inspect.isawaitable(out):
            return _with_timeout(out, self.timeout_s)
        return out

    def _failed(self, name: str, exc: BaseException, n: int) -> list[None]:
        """A function raised: stop with one line, or (``on_error=zero``) its values count as None."""
        if isinstance(exc, UserError):
            raise exc
        if isinstance(exc, RewardTimeout) and self.on_error == "raise":
            raise UserError(
                f"reward function {name!r} {exc} on a batch of {n} samples — make it faster, raise "
                "rewards.timeout_s, or set rewards.on_error=zero"
            )
        if self.on_error == "raise":
            raise UserError(
                f"reward function {name!r} raised {type(exc).__name__} on a batch of {n} samples: "
                f"{one_line(exc)} — fix the function or set rewards.on_error=zero"
            ) from exc
        if name not in self._warned:
            self._warned.add(name)
            logger.warning(
                "reward function %r raised %s: %s; its values count as None for this batch "
                "(rewards.on_error=zero; later errors of this function are not logged)",
                name,
                type(exc).__name__,
                one_line(exc),
            )
        return [None] * n

    def _checked(self, name: str, raw: Any, lengths: list[int]) -> list[Value]:
        n = len(lengths)
        if hasattr(raw, "tolist"):  # a tensor or an array
            raw = raw.tolist()
        if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
            raise UserError(
                f"reward function {name!r} returned {type(raw).__name__}, not a list — return one "
                "float (or None, or a per-token list) per completion"
            )
        if len(raw) != n:
            raise UserError(
                f"reward function {name!r} returned {len(raw)} values for {n} completions — return one per completion"
            )
        return [self._check_value(name, i, v, lengths[i]) for i, v in enumerate(raw)]

    def _check_value(self, name: str, i: int, value: Any, length: int) -> Value:
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            if len(value) != length:
                raise UserError(
                    f"reward function {name!r} returned {len(value)} per-token rewards for sample {i}, which has "
                    f"{length} completion tokens — return one value per token of completion_ids[{i}]"
                )
            dense = []
            for v in value:
                x = _as_finite(v)
                if x is None:
                    x = self._nonfinite(name, i, v)
                    if x is None:
                        return None
                dense.append(x)
            return dense
        x = _as_finite(value)
        return x if x is not None else self._nonfinite(name, i, value)

    def _nonfinite(self, name: str, i: int, value: Any) -> float | None:
        if self.on_nonfinite == "raise":
            raise UserError(
                f"reward function {name!r} returned {value!r} ({type(value).__name__}) for sample {i} — return "
                "a finite float or None, or set rewards.on_nonfinite=zero"
            )
        return 0.0 if self.on_nonfinite == "zero" else None

    def _combine(self, results: list[list[Value]], lengths: list[int]) -> RewardOutput:
        n = len(lengths)
        width = max(lengths, default=0) or 1
        scores = torch.zeros(n, dtype=torch.float64)
        tokens = torch.zeros(n, width, dtype=torch.float64)
        any_dense = False
        per_function: dict[str, torch.Tensor] = {}
        for name, weight, values in zip(self.names, self.weights, results):
            seq = torch.full((n,), math.nan, dtype=torch.float64)
            for i, v in enumerate(values):
                if v is None:
                    continue
                if isinstance(v, list):
                    any_dense = True
                    seq[i] = math.fsum(v)
                    tokens[i, : len(v)] += weight * torch.tensor(v, dtype=torch.float64)
                else:
                    seq[i] = v
                    tokens[i, max(lengths[i] - 1, 0)] += weight * v
            per_function[name] = seq.float()
            scores += weight * torch.nan_to_num(seq, nan=0.0)
        return RewardOutput(
            scores=scores.float(),
            per_function=per_function,
            token_rewards=tokens.float() if any_dense else None,
        )


class _Log:
    """What TRL's ``log_extra`` / ``log_metric`` keywords collect during one batch."""

    def __init__(self, n: int) -> None:
        self.n, self.columns, self.metrics = n, {}, {}

    def extra(self, column: str, values: list) -> None:
        if len(values) != self.n:
            raise UserError(f"log_extra({column!r}, ...) got {len(values)} values for {self.n} completions")
        self.columns[str(column)] = list(values)

    def metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(str(name), []).append(float(value))


class RewardTimeout(Exception):
    """A reward function overran ``rewards.timeout_s`` (handled by the ``on_error`` policy)."""


async def _with_timeout(awaitable: Any, timeout_s: float) -> Any:
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except asyncio.TimeoutError:
        raise RewardTimeout(f"did not return within rewards.timeout_s={timeout_s:g} s") from None


def _keywords_for(name: str, fn: Callable[..., Any], keywords: dict[str, Any]) -> dict[str, Any]:
    """The keywords to call ``fn`` with: all of them if it takes ``**kwargs`` (TRL's contract), else those
    it names. A parameter it requires that is not available is a one-line error listing what is."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature (some C callables): pass everything
        return keywords
    missing = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and (p.name not in keywords or p.kind is inspect.Parameter.POSITIONAL_ONLY)
    ]
    if missing:
        close = difflib.get_close_matches(missing[0], list(keywords), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"reward function {name!r} needs keyword {missing[0]!r}{hint}, which it is not given; reward functions "
            f"are called by keyword with: {', '.join(keywords)} — rename the parameter, or take **kwargs"
        )
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return keywords
    return {p.name: keywords[p.name] for p in params if p.name in keywords}


def completion_texts(completions: list, final_answer: bool = False) -> list[str]:
    """Each completion as text, for plain (strings) and conversational (lists of messages) data alike.
    ``final_answer``: for messages, only the last assistant message (in an episode, the model's last
    turn, not a tool's output)."""
    out = []
    for c in completions:
        if isinstance(c, str):
            out.append(c)
        elif final_answer:
            said = [m for m in c if m.get("role") == "assistant"]
            out.append(str(said[-1].get("content", "")) if said else "")
        else:
            out.append("".join(str(m.get("content", "")) for m in c))
    return out


def token_reward_tensor(out: RewardOutput, mask: torch.Tensor) -> torch.Tensor:
    """The (B, T) token rewards r_t of a batch with action mask ``mask``: the one place where sequence
    scores and dense rewards become the tensor the advantage estimators read. A sequence score sits on
    the last action token; a dense list on its own tokens (cut or padded to T)."""
    from .core import place_scores

    if out.token_rewards is None:
        return place_scores(out.scores.to(mask.device), mask)
    tr = out.token_rewards.to(mask.device)
    T = mask.shape[1]
    return torch.nn.functional.pad(tr, (0, max(0, T - tr.shape[1])))[:, :T] * mask


def score_batch(rewards: RewardSet, batch, trainer_state: Any = None) -> RewardOutput:
    """Score a rollout :class:`~rlhf_pg.batch.Batch` in place: ``scores``, ``token_rewards`` and
    ``reward_per_function``; returns the :class:`RewardOutput` (with what the functions logged)."""
    out = rewards(
        batch.prompts,
        batch.completions,
        batch.completion_lists(),
        batch.columns,
        prompt_text=batch.prompt_texts,
        trainer_state=trainer_state,
        conversations=batch.messages or None,
        turns=batch.turns or None,
    )
    dev = batch.action_mask.device
    batch.scores = out.scores.to(dev)
    batch.token_rewards = token_reward_tensor(out, batch.action_mask)
    if batch.env_rewards is not None:  # an episode's per-turn rewards, on each turn's last token
        env = batch.env_rewards.to(dev) * batch.action_mask
        batch.token_rewards = batch.token_rewards + env
        batch.scores = batch.scores + env.sum(-1)  # the episode's total reward
    batch.reward_per_function = {k: v.to(dev) for k, v in out.per_function.items()}
    return out


def _build(spec: RewardSpec) -> RewardFn:
    """Load ``spec.name`` and bind (function) or apply (factory/class) ``spec.kwargs``."""
    obj = load_reward_function(spec.name)
    _check_options(spec, obj)
    if not _is_factory(obj):
        return functools.partial(obj, **spec.kwargs) if spec.kwargs else obj
    try:
        fn = obj(**spec.kwargs)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"building reward function {spec.name!r} raised {type(exc).__name__}: {one_line(exc)} — fix its kwargs"
        ) from exc
    if not callable(fn):
        raise UserError(f"reward function {spec.name!r} built a {type(fn).__name__}, which is not callable")
    return fn


def _check_options(spec: RewardSpec, obj: Callable[..., Any]) -> None:
    """Reject recipe kwargs that are not named parameters (a typo would vanish into ``**kwargs``)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # some C callables have no signature
        return
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    reserved = () if _is_factory(obj) else RESERVED_KEYWORDS
    options = [p.name for p in params if p.kind in kinds and p.name not in reserved]
    for key in spec.kwargs:
        if key not in options:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"reward function {spec.name!r} has no option {key!r}{hint}; options: {', '.join(options) or 'none'}"
                " — fix its kwargs"
            )


def _as_finite(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` if it is not a finite real number."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def _preview(prompt: Any, limit: int = 60) -> str:
    """A short one-line repr of a prompt (the last message's content for chat prompts)."""
    if not isinstance(prompt, str):
        prompt = str(prompt[-1].get("content", "")) if prompt else ""
    return repr(prompt if len(prompt) <= limit else prompt[: limit - 1] + "…")


# --------------------------------------------------------------------------------------------
# Built-in reward functions

_NUMBER = re.compile(r"(?:(?<!\d)-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
"""A number: optional minus (not right after a digit, so '5-7' is 5 and 7), thousands commas, decimals."""


def last_number(text: str) -> float | None:
    """The last number in ``text`` as a float ("I think 3, no 1,234." -> 1234.0), or None if there is none."""
    matches = _NUMBER.findall(text)
    return float(matches[-1].replace(",", "")) if matches else None


@register_reward("accuracy")
def accuracy(prompts: list, completions: list[str], answer: list | None = None, **kwargs: Any) -> list[float | None]:
    """1.0 if the last number in the completion equals the ``answer`` column, else 0.0.

    In a conversational episode the completion is the model's last turn (a tool's output does not count).

    Answers may be numbers or strings whose last number is the answer ("42", "42.0", "#### 42",
    a GSM8K solution ending in "#### 1,234"); numbers are compared with tolerance 1e-6. A missing
    answer (None, NaN or blank) gives None.
    """
    if answer is None:
        raise UserError(
            "reward function 'accuracy' needs an 'answer' column in the dataset — add one, or use another reward"
        )
    out: list[float | None] = []
    for i, (completion, ans) in enumerate(zip(completion_texts(completions, final_answer=True), answer)):
        if ans is None or (isinstance(ans, float) and math.isnan(ans)) or (isinstance(ans, str) and not ans.strip()):
            out.append(None)
            continue
        target = float(ans) if isinstance(ans, numbers.Real) else last_number(str(ans))
        if target is None:
            raise UserError(
                f"reward function 'accuracy': answer {ans!r} of sample {i} contains no number — accuracy compares "
                "numbers; use a custom reward for other answers"
            )
        got = last_number(completion)
        out.append(1.0 if got is not None and abs(got - target) <= 1e-6 else 0.0)
    return out


DEFAULT_FORMAT_PATTERN = r"-?\d[\d,]*(\.\d+)?"


@register_reward("format")
def format_reward(
    prompts: list, completions: list[str], pattern: str = DEFAULT_FORMAT_PATTERN, **kwargs: Any
) -> list[float]:
    """1.0 if the whole stripped completion matches the regex ``pattern`` (:func:`re.fullmatch`), else 0.0.

    The default pattern accepts a bare number ("42", "-3.5", "1,234"). Use ``(?s)`` in ``pattern``
    to let ``.`` span lines, e.g. ``(?s)<think>.*</think>\\s*<answer>.*</answer>``.
    """
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UserError(
            f"reward function 'format': invalid regex pattern {pattern!r}: {exc} — fix kwargs.pattern"
        ) from None
    return [1.0 if regex.fullmatch(c.strip()) else 0.0 for c in completion_texts(completions)]


@register_reward("length_penalty")
def length_penalty(
    prompts: list,
    completions: list[str],
    completion_ids: list[list[int]],
    target: int = 0,
    scale: float = 100.0,
    **kwargs: Any,
) -> list[float]:
    """``-max(0, n_tokens - target) / scale``: 0 up to ``target`` tokens, then -1 per ``scale`` extra tokens.

    ``n_tokens`` is the completion's token count (including a final EOS token if one was generated).
    With the defaults a 250-token completion gets -2.5.
    """
    if scale <= 0:
        raise UserError(f"reward function 'length_penalty': scale={scale} must be > 0 — fix kwargs.scale")
    return [-max(0, len(ids) - target) / scale for ids in completion_ids]


@functools.cache
def _vader() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as exc:
        raise UserError(
            "reward function 'sentiment' needs the vaderSentiment package — pip install vaderSentiment"
        ) from exc
    return SentimentIntensityAnalyzer()


@register_reward("sentiment")
def sentiment(prompts: list, completions: list[str], **kwargs: Any) -> list[float]:
    """VADER compound sentiment of the completion, in [-1, 1] (positive text scores high)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(c)["compound"]) for c in completion_texts(completions)]


@register_reward("banned_word_penalty")
def banned_word_penalty(
    prompts: list,
    completions: list[str],
    completion_tokens: list[list[str]] | None = None,
    words: Sequence[str] = ("sorry", "unfortunately"),
    penalty: float = -0.1,
    **kwargs: Any,
) -> list[list[float]]:
    """Dense reward: ``penalty`` on every completion token whose text contains a banned word, 0 elsewhere.

    A token matches when one of ``words`` occurs in its decoded text as a whole word, ignoring case
    (" Sorry" matches "sorry"; "thereby" does not match "the"). Matching is per token, so a word the
    tokenizer splits into several tokens is not caught: write a custom dense reward for phrases.
    Needs the ``completion_tokens`` keyword, which :class:`RewardSet` passes when given a tokenizer.
    """
    if completion_tokens is None:
        raise UserError(
            "reward function 'banned_word_penalty' needs completion_tokens: build the RewardSet with tokenizer="
        )
    if isinstance(words, str):
        words = [words]
    if not words:
        return [[0.0] * len(tokens) for tokens in completion_tokens]
    regex = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return [[penalty if regex.search(t) else 0.0 for t in tokens] for tokens in completion_tokens]


class RewardModelScorer:
    """A sequence-classification model as a reward function (same call signature as the others).

    Scores ``prompt_text + completion`` with ``AutoModelForSequenceClassification`` and returns the
    logit of class 0 (the single logit of a one-label reward model), in batches of ``batch_size``.
    From a recipe: ``{name: reward_model, kwargs: {model: path/or/hub-id}}``.
    """

    def __init__(self, model_name_or_path: str, batch_size: int = 8, device: str = "cpu") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path)
        except Exception as exc:
            raise UserError(
                f"cannot load reward model {model_name_or_path!r}: {type(exc).__name__}: {one_line(exc)} — set "
                "kwargs.model to a local model directory or a hub id of a sequence-classification model"
            ) from exc
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise UserError(
                    f"reward model {model_name_or_path!r}: its tokenizer has neither a pad nor an eos token "
                    "— add a pad token to it"
                )
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model.config.pad_token_id = self.tokenizer.pad_token_id  # lets the model find each last token
        self.model.to(device).eval()
        self.batch_size = batch_size
        self.device = device

    @torch.inference_mode()
    def __call__(self, prompts: list, completions: list[str], *, prompt_text: list[str], **kwargs: Any) -> list[float]:
        """The model's score of each ``prompt_text[i] + completions[i]``."""
        texts = [p + c for p, c in zip(prompt_text, completion_texts(completions))]
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=True
            ).to(self.device)
            logits = self.model(**batch).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores


@register_reward("reward_model", factory=True)
def reward_model(model: str, batch_size: int = 8, device: str = "cpu") -> RewardModelScorer:
    """Build a :class:`RewardModelScorer` from recipe kwargs: ``model`` (path or hub id), ``batch_size``, ``device``."""
    return RewardModelScorer(model, batch_size=batch_size, device=device)
