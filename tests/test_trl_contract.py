"""Reward functions written the way TRL's documentation writes them run unchanged.

TRL calls every reward function by keyword — ``prompts=``, ``completions=``, ``completion_ids=``, the
dataset's other columns, ``trainer_state=``, ``log_extra=``, ``log_metric=`` — and a function takes
what it needs plus ``**kwargs``. For conversational data a completion is ``[{"role": "assistant",
"content": ...}]``. Each style below (written anew for these tests) trains one step of the tiny model,
and the value it returned is checked in the logged reward.
"""

import json
import math
import re

import pytest

from rlhf_pg.errors import UserError
from rlhf_pg.trainer import Trainer

FUNCTIONS = '''
import asyncio
import re


def reward_len(completions, **kwargs):
    """Text data: completions close to 20 characters score best."""
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward(completions, **kwargs):
    """Conversational data: 1 if the reply starts with a digit."""
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(r"\\s*\\d", c) else 0.0 for c in contents]


def answer_in_reply(completions, answer, **kwargs):
    """A dataset column by name, next to the completions."""
    return [1.0 if str(a) in c[0]["content"] else 0.0 for c, a in zip(completions, answer)]


def n_tokens(prompts, completions, completion_ids, **kwargs):
    """The prompts and the sampled token ids."""
    assert len(prompts) == len(completions) == len(completion_ids)
    return [float(len(ids)) for ids in completion_ids]


def by_step(completions, trainer_state, **kwargs):
    """Reward shaping over training: the trainer state's global step."""
    return [float(trainer_state.global_step)] * len(completions)


async def async_len(completions, **kwargs):
    """An async reward function (e.g. one that calls a remote judge)."""
    await asyncio.sleep(0)
    return [-abs(20 - len(completion)) for completion in completions]


def logging_len(completions, log_extra, log_metric, **kwargs):
    """Extra per-sample values and a scalar metric, logged by the function itself."""
    chars = [len(c) for c in completions]
    log_extra("n_chars", chars)
    log_metric("mean_chars", sum(chars) / len(chars))
    return [float(n) for n in chars]


def no_kwargs(completions):
    """No **kwargs: gets only what it names (TRL would refuse the other keywords)."""
    return [1.0] * len(completions)


def singular(completion, **kwargs):
    """A typo in the signature."""
    return [0.0]
'''


def _text_data(path):
    rows = [{"prompt": f"Name a color, then count to {i}:", "answer": str(i)} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _chat_data(path):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def run(tmp_path, tiny_config):
    """``run(function, chat=False, steps=1)`` → (step records, samples) of a short run rewarded by it."""
    (tmp_path / "fns.py").write_text(FUNCTIONS)
    data = {"text": _text_data(tmp_path / "text.jsonl"), "chat": _chat_data(tmp_path / "chat.jsonl")}

    def go(fn, chat=False, steps=1):
        out = tmp_path / f"run_{fn}_{chat}"
        cfg = tiny_config(
            tmp_path,
            output_dir=str(out),
            data={"train": data["chat" if chat else "text"], "eval_limit": 2, "eval_split": "train"},
            rewards={"functions": [{"name": f"{tmp_path / 'fns.py'}:{fn}"}]},
            train={"max_steps": steps, "eval_at_start": False, "save_model": False, "save_every": 0},
        )
        Trainer(cfg).train()
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        return [r for r in recs if "reward" in r], samples

    return go


def _mean(xs):
    return sum(xs) / len(xs)


def test_first_example_of_trls_docs_on_text_data(run):
    steps, samples = run("reward_len")
    assert isinstance(samples[0]["completion"], str)
    assert steps[0]["reward"] == pytest.approx(_mean([-abs(20 - len(s["completion"])) for s in samples]))


def test_conversational_completions_are_assistant_messages(run):
    steps, samples = run("format_reward", chat=True)
    want = [1.0 if re.match(r"\s*\d", s["completion"]) else 0.0 for s in samples]
    assert steps[0]["reward"] == pytest.approx(_mean(want))


def test_dataset_column_by_name(run):
    steps, samples = run("answer_in_reply", chat=True)
    answers = {f"What is {i} + 1?": str(i + 1) for i in range(12)}
    want = [1.0 if answers[s["prompt"]] in s["completion"] else 0.0 for s in samples]
    assert steps[0]["reward"] == pytest.approx(_mean(want))


def test_prompts_and_completion_ids(run):
    steps, _ = run("n_tokens")
    assert steps[0]["reward"] == pytest.approx(steps[0]["completion_len"])  # mean token count


def test_trainer_state_global_step(run):
    steps, _ = run("by_step", steps=2)
    assert [s["reward"] for s in steps] == [0.0, 1.0]  # RL steps done before each step


def test_async_reward_function(run):
    steps, samples = run("async_len")
    assert steps[0]["reward"] == pytest.approx(_mean([-abs(20 - len(s["completion"])) for s in samples]))


def test_log_extra_and_log_metric(run):
    steps, samples = run("logging_len")
    assert all(s["n_chars"] == len(s["completion"]) for s in samples)  # log_extra → samples.jsonl
    assert steps[0]["mean_chars"] == pytest.approx(_mean([len(s["completion"]) for s in samples]))  # log_metric
    assert steps[0]["reward"] == pytest.approx(steps[0]["mean_chars"])


def test_function_without_kwargs_gets_what_it_names(run):
    steps, _ = run("no_kwargs")
    assert steps[0]["reward"] == 1.0


def test_wrong_signature_is_one_line_before_sampling(tmp_path, tiny_config, monkeypatch):
    (tmp_path / "fns.py").write_text(FUNCTIONS)
    cfg = tiny_config(
        tmp_path,
        data={"train": _text_data(tmp_path / "t.jsonl"), "eval_split": "train"},
        rewards={"functions": [{"name": f"{tmp_path / 'fns.py'}:singular"}]},
    )
    sampled = []
    monkeypatch.setattr(Trainer, "rollout", lambda self, step=None: sampled.append(step))
    with pytest.raises(UserError) as e:
        Trainer(cfg)
    msg = str(e.value)
    assert "needs keyword 'completion' (did you mean 'completions'?)" in msg and "\n" not in msg
    for keyword in ("prompts", "completions", "completion_ids", "answer", "trainer_state", "log_extra"):
        assert keyword in msg  # the keywords it could take
    assert not sampled


def test_missing_column_names_the_available_keywords(tmp_path, tiny_config):
    (tmp_path / "fns.py").write_text(FUNCTIONS)
    rows = tmp_path / "noanswer.jsonl"
    rows.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"hi {i}"}]}) + "\n" for i in range(4)))
    cfg = tiny_config(
        tmp_path,
        data={"train": str(rows), "eval_split": "train"},
        rewards={"functions": [{"name": f"{tmp_path / 'fns.py'}:answer_in_reply"}]},
    )
    with pytest.raises(UserError, match=r"needs keyword 'answer'.*called by keyword with: prompts, completions"):
        Trainer(cfg)


def test_builtins_read_conversational_completions():
    from rlhf_pg.rewards import REWARD_REGISTRY

    chat = [[{"role": "assistant", "content": "It is 42."}], [{"role": "assistant", "content": "no idea"}]]
    assert REWARD_REGISTRY["accuracy"](prompts=["q", "q"], completions=chat, answer=["42", "42"]) == [1.0, 0.0]
    assert REWARD_REGISTRY["format"](prompts=["q", "q"], completions=chat) == [0.0, 0.0]
    assert math.isfinite(REWARD_REGISTRY["sentiment"](prompts=["q"], completions=chat[:1])[0])
