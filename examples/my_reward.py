"""Example custom reward functions: copy this file, edit it, and name its functions in a recipe.

Reward functions are called as TRL calls them — by keyword — so functions written for TRL work here
unchanged::

    fn(*, prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **columns) -> list

* ``prompts``: the dataset's prompts; ``completions``: the generated completions, one per sample. For
  text data both are strings; for conversational data (prompts are lists of chat messages) each
  completion is ``[{"role": "assistant", "content": text}]``, as in TRL.
* Every other dataset column (e.g. ``answer``), ``completion_ids`` (each completion's token ids),
  ``trainer_state`` (``.global_step``: RL steps done), ``log_extra(column, values)`` and
  ``log_metric(name, value)``; ours besides: ``prompt_text`` (each prompt as the model saw it) and,
  when the trainer has a tokenizer, ``completion_tokens`` (each completion token decoded on its own).
  Take the ones you need as named parameters and swallow the rest with ``**kwargs``.
* Return one entry per completion: a float, ``None`` when the reward does not apply to that sample
  (it then counts as 0 in the sum and is left out of the function's logged mean), or a list with
  one float per completion token (a dense reward, as ``repeated_token_penalty`` below).
* Options under ``kwargs:`` in the recipe arrive as keyword arguments (``tag`` and ``penalty`` below).

Use it from a recipe (paths are relative to the directory you run ``rlhf-pg`` from)::

    rewards:
      functions:
        - name: accuracy
        - name: examples/my_reward.py:tagged_answer
          weight: 0.5
          kwargs: {tag: answer}
        - name: examples/my_reward.py:repeated_token_penalty
          kwargs: {penalty: -0.05}

or from Python::

    from rlhf_pg.rewards import RewardSet, RewardSpec
    rewards = RewardSet([RewardSpec("examples/my_reward.py:tagged_answer", weight=0.5, kwargs={"tag": "answer"})])

A file can also be imported as a module (``my_package.my_reward:tagged_answer``) when it is installed
or on ``PYTHONPATH``.
"""

from __future__ import annotations

import re
from typing import Any


def tagged_answer(
    prompts: list, completions: list[str], answer: list | None = None, tag: str = "answer", **kwargs: Any
) -> list[float | None]:
    """1.0 if the completion puts the right answer between ``<tag>`` and ``</tag>``, else 0.0.

    ``answer`` is the dataset's ``answer`` column; a sample without an answer gets ``None``.
    Answers are compared as text after stripping spaces, so "<answer> 42 </answer>" matches "42".
    """
    if answer is None:
        raise ValueError("tagged_answer needs an 'answer' column in the dataset")
    pattern = re.compile(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", re.DOTALL)
    scores: list[float | None] = []
    for completion, expected in zip(_texts(completions), answer):
        if expected is None:
            scores.append(None)
            continue
        found = pattern.findall(completion)
        scores.append(1.0 if found and found[-1].strip() == str(expected).strip() else 0.0)
    return scores


def _texts(completions: list) -> list[str]:
    """Text data gives strings; conversational data gives [{"role": "assistant", "content": ...}]."""
    return [c if isinstance(c, str) else c[0]["content"] for c in completions]


def repeated_token_penalty(
    prompts: list, completions: list[str], completion_ids: list[list[int]], penalty: float = -0.05, **kwargs: Any
) -> list[list[float]]:
    """Dense reward: ``penalty`` on every token that repeats the token just before it, 0 elsewhere.

    The list for each completion has one value per token of ``completion_ids``, so the trainer can
    credit each stutter ("the the the") to the exact token that produced it.
    """
    return [[penalty if t > 0 and ids[t] == ids[t - 1] else 0.0 for t in range(len(ids))] for ids in completion_ids]
