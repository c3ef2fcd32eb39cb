"""Multi-turn episodes (rlhf_pg/envs.py): token-in/token-out segments, masks, the KV cache carried
across turns, per-turn rewards, the trainer and eval with an environment, and every bad input."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import cpu_subprocess_env, tiny_tree

from rlhf_pg import envs
from rlhf_pg.backends import HFBackend, VLLMEpisodeSession
from rlhf_pg.config import build_config
from rlhf_pg.data import render_prompt
from rlhf_pg.envs import ChatFormat, EnvStep, Episodes
from rlhf_pg.errors import UserError
from rlhf_pg.forward import LAYOUTS, PassSettings, forward, with_layout
from rlhf_pg.rollout import SamplingParams, sample

ROOT = Path(__file__).parents[1]

NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""A Zephyr-style template: no default system message, EOS closes every message."""

CLOSING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '[assistant]\\n' + m['content'] + ' [END]\\n' }}"
    "{% else %}{{ '[' + m['role'] + '] ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]\\n' }}{% endif %}"
)
"""A template whose assistant messages end with text, not the EOS token. (Its generation prompt ends
with a newline: one ending in a space would let BPE merge it with the answer's first character when
the whole conversation is tokenized as one string — the trajectory is still what was sampled, but it
then differs from re-tokenizing the text, which is the point of never doing that.)"""


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def with_template(tokenizer, template: str):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    return tok


# ------------------------------------------------------------------------------ token equality
CONVERSATION = [
    ("What is 12*34? Use the tool.", '<tool_call>{"name": "multiply", "arguments": {"a": 12, "b": 34}}</tool_call>'),
    ("408", "The answer is 408."),
    ("Are you sure?\nThink again.", "Yes: 12 × 34 = 408.\n"),
]


@pytest.mark.parametrize(
    "template", [None, NO_SYSTEM_TEMPLATE, CLOSING_TEMPLATE], ids=["smollm2", "no-system", "closing"]
)
@pytest.mark.parametrize("end", ["eos", "stop"])
def test_segments_concatenate_to_the_templates_rendering(tokenizer, template, end):
    """prompt + turn + segment + turn + ... equals the template's rendering of the whole conversation,
    token for token, whether each model turn ended with EOS or with a stop string (no EOS)."""
    tok = with_template(tokenizer, template) if template else tokenizer
    fmt = ChatFormat(tok, chat=True)
    messages = [{"role": "user", "content": CONVERSATION[0][0]}]
    traj = list(tok(render_prompt(messages, 0, tok, None), add_special_tokens=False)["input_ids"])
    for k, (_, answer) in enumerate(CONVERSATION):
        turn = list(tok(answer, add_special_tokens=False)["input_ids"])
        if end == "eos" and template != CLOSING_TEMPLATE:
            turn.append(tok.eos_token_id)
        traj += turn
        messages.append({"role": "assistant", "content": answer})
        if k + 1 < len(CONVERSATION):
            obs = [{"role": "user", "content": CONVERSATION[k + 1][0]}]
            traj += fmt.segment(obs, ended_with_eos=turn[-1] == tok.eos_token_id)
            messages += obs
    full = tok.apply_chat_template(messages, tokenize=False)
    want = tok(full, add_special_tokens=False)["input_ids"]
    # the template closes the last assistant turn after what the model sampled: compare up to there
    assert traj == want[: len(traj)]
    closing = fmt.closing_after_eos if traj[-1] == tok.eos_token_id else fmt.closing
    assert tok.decode(want[len(traj) :]) == closing


def test_smollm2_segment_is_the_end_of_turn_and_the_next_header(tokenizer):
    fmt = ChatFormat(tokenizer, chat=True)
    assert fmt.segment_text("408", ended_with_eos=True) == "\n<|im_start|>user\n408<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.segment_text("408", ended_with_eos=False).startswith("<|im_end|>\n<|im_start|>user")
    tool = fmt.segment_text([{"role": "tool", "content": "408"}], ended_with_eos=True)
    assert tool == "\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_is_not_append_only_is_refused(tokenizer):
    tok = with_template(tokenizer, "{{ messages | length }}" + NO_SYSTEM_TEMPLATE)
    fmt = ChatFormat(tok, chat=True)
    with pytest.raises(UserError) as e:
        fmt.segment("hi", ended_with_eos=True)
    assert "append-only" in one_line(e)


def test_plain_text_segments_are_the_observation_tokens(tokenizer):
    fmt = ChatFormat(tokenizer, chat=False)
    assert fmt.segment(" ok", ended_with_eos=False) == tokenizer(" ok", add_special_tokens=False)["input_ids"]
    with pytest.raises(UserError) as e:
        fmt.segment([{"role": "user", "content": "x"}], ended_with_eos=False)
    assert "plain text" in one_line(e)


# ------------------------------------------------------------------------------------ sampling
class CoinEnv:
    """Stochastic replies ("heads"/"tails", from its own RNG), a reward on every turn, and an end after
    ``turns`` model turns."""

    info_keys = ("flips",)

    def __init__(self, turns: int = 3, seed: int = 0):
        self.turns, self.n, self.rng = turns, 0, random.Random(seed)

    def reset(self, row):
        return None  # the row's prompt

    def step(self, text, token_ids):
        self.n += 1
        assert isinstance(text, str) and all(isinstance(t, int) for t in token_ids)
        obs = None if self.n >= self.turns else self.rng.choice(["heads", "tails, then heads"])
        return EnvStep(obs, reward=float(self.n), info={"flips": 1})


def small_data(tokenizer, n=2):
    from rlhf_pg.data import load_prompt_dataset

    return load_prompt_dataset("arithmetic", "train", tokenizer=tokenizer, task_kwargs={"n_train": 8, "n_eval": 2})


def spec_for(tokenizer, make_env, **kw) -> Episodes:
    make_env.name = "coin"
    keys = ("turns", "env_tokens", "truncated", "flips")
    return Episodes(make_env=make_env, name="coin", chat=ChatFormat(tokenizer, chat=True), stat_keys=keys, **kw)


class CountingModel(torch.nn.Module):
    """Records the number of new real tokens fed per forward (attention columns added that are 1)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.fed, self.calls = model, [], []

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, attention_mask, **kw):
        self.calls.append(tuple(input_ids.shape))
        self.fed.append(int(attention_mask[:, -input_ids.shape[1] :].sum()))
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)


def test_episodes_keep_tokens_masks_and_the_kv_cache(tiny_model, tokenizer, one_thread):
    data = small_data(tokenizer)
    counting = CountingModel(tiny_model)
    backend = HFBackend(counting, tokenizer)
    spec = spec_for(tokenizer, lambda: CoinEnv(turns=3), max_turns=4, max_episode_tokens=200)
    params = SamplingParams(max_new_tokens=5, temperature=1.0)
    torch.manual_seed(0)
    batch = sample(
        backend, tokenizer, data, [0, 1], 2, params, generator=torch.Generator().manual_seed(1), episodes=spec
    )
    B = 4
    assert batch.size == B and batch.action_mask.shape == batch.completion_mask.shape
    fmt = spec.chat
    for b in range(B):
        n = int(batch.completion_mask[b].sum())
        ids, act = batch.completion_ids[b, :n].tolist(), batch.action_mask[b, :n].tolist()
        assert batch.completion_mask[b, :n].eq(1).all() and batch.completion_mask[b, n:].eq(0).all()
        # the trajectory = turn, segment, turn, segment, turn: each segment exactly ChatFormat's
        runs, start = [], 0
        for t in range(1, n + 1):
            if t == n or act[t] != act[start]:
                runs.append((act[start], ids[start:t]))
                start = t
        turns = [r for a, r in runs if a]
        segments = [r for a, r in runs if not a]
        assert len(turns) == 3 == len(batch.turns[b]) and len(segments) == 2
        obs = [m["content"] for m in batch.messages[b] if m["role"] == "user"]
        for turn, seg, o in zip(turns, segments, obs):
            assert seg == fmt.segment(o, ended_with_eos=turn[-1] == tokenizer.eos_token_id)
        assert [m["role"] for m in batch.messages[b]] == ["assistant", "user", "assistant", "user", "assistant"]
        assert batch.turns[b] == tokenizer.batch_decode(turns, skip_special_tokens=True)
        # per-turn rewards 1, 2, 3 on each turn's last token
        ends = [i for i in range(n) if act[i] and (i + 1 == n or not act[i + 1])]
        assert batch.env_rewards[b, ends].tolist() == [1.0, 2.0, 3.0]
        assert batch.env_rewards[b].sum().item() == 6.0
        assert (batch.old_logprobs[b] * (1 - batch.action_mask[b])).abs().sum() == 0
    assert batch.episode_stats["turns"].tolist() == [3.0] * B
    assert batch.episode_stats["flips"].tolist() == [3.0] * B
    # the KV cache carries across turns: every real token is fed exactly once (the two distinct prompts
    # once each, then only sampled and environment tokens), never a re-prefill of the history
    prompt_tokens = int(batch.prompt_mask[::2].sum())
    assert sum(counting.fed) == prompt_tokens + int(batch.completion_mask.sum())
    assert max(c[1] for c in counting.calls[1:]) <= max(len(s) for s in segments)


def test_sampled_logprobs_equal_the_training_forward_over_the_trajectory(tiny_model, tokenizer, one_thread):
    """Holes in the sampling cache (episodes waiting for others, left-padded segments) are invisible:
    the log-probs recorded while sampling equal the trainer's forward over the compact trajectory."""
    data = small_data(tokenizer)
    spec = spec_for(
        tokenizer, lambda: CoinEnv(turns=3, seed=random.randrange(100)), max_turns=3, max_episode_tokens=200
    )
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    batch = sample(
        HFBackend(tiny_model, tokenizer),
        tokenizer,
        data,
        [0, 1, 2],
        3,
        params,
        generator=torch.Generator().manual_seed(2),
        episodes=spec,
    )
    assert batch.action_mask.sum() < batch.completion_mask.sum()  # there are environment tokens
    for layout in LAYOUTS:  # packed (the trainer's default), shared prefix, padded
        res = forward(tiny_model.eval(), batch, with_layout(PassSettings(), layout))
        diff = ((res.logprobs - batch.old_logprobs) * batch.action_mask).abs().max().item()
        assert diff < 1e-4, (layout, diff)


def test_uniform_draws_make_episodes_independent_of_their_batch(tiny_model, tokenizer, one_thread):
    """With the trainer's uniforms, an episode's tokens depend on its own row of draws only: sampling
    rows {0, 1} together or one by one gives the same episodes (what makes N processes equal one)."""
    data = small_data(tokenizer)
    spec = spec_for(tokenizer, lambda: CoinEnv(turns=2), max_turns=2, max_episode_tokens=100)
    params = SamplingParams(max_new_tokens=4)
    u = torch.rand(4, 100, generator=torch.Generator().manual_seed(5))
    be = HFBackend(tiny_model, tokenizer)
    both = sample(be, tokenizer, data, [0, 1], 2, params, uniforms=u, episodes=spec)
    for i in range(2):
        one = sample(be, tokenizer, data, [i], 2, params, uniforms=u[2 * i : 2 * i + 2], episodes=spec)
        n = int(one.completion_mask.sum(-1).max())
        assert torch.equal(one.completion_ids[:, :n], both.completion_ids[2 * i : 2 * i + 2, :n])


def test_episode_budget_ends_an_episode_before_the_observation(tiny_model, tokenizer, one_thread):
    data = small_data(tokenizer)
    spec = spec_for(tokenizer, lambda: CoinEnv(turns=10), max_turns=10, max_episode_tokens=12)
    batch = sample(
        HFBackend(tiny_model, tokenizer),
        tokenizer,
        data,
        [0],
        2,
        SamplingParams(max_new_tokens=4),
        generator=torch.Generator().manual_seed(0),
        episodes=spec,
    )
    assert int(batch.completion_mask.sum(-1).max()) <= 12
    assert batch.episode_stats["truncated"].tolist() == [1.0, 1.0]
    for b in range(2):
        n = int(batch.completion_mask[b].sum())
        assert batch.action_mask[b, n - 1] == 1  # an episode never ends on an unanswered observation


class FakeOutput:
    def __init__(self, prompt, ids, lps):
        self.prompt_token_ids = prompt
        self.outputs = [type("C", (), {"token_ids": ids, "logprobs": [{t: lp} for t, lp in zip(ids, lps)]})()]


class FakeLLM:
    """What VLLMEpisodeSession uses of vllm.LLM: generate(token prompts, sampling params)."""

    def __init__(self, eos):
        self.eos, self.requests = eos, []

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for p, sp in zip(prompts, params):
            ids = p["prompt_token_ids"]
            self.requests.append((list(ids), sp))
            gen = [7 + len(ids) % 3, 8, self.eos, 9][: sp["max_tokens"]]
            outs.append(FakeOutput(list(ids), gen, [-0.5] * len(gen)))
        return outs


def test_vllm_episodes_send_the_whole_history_as_tokens(tokenizer):
    llm = FakeLLM(tokenizer.eos_token_id)
    params = SamplingParams(max_new_tokens=3)
    s = VLLMEpisodeSession(llm, dict, tokenizer, [[1, 2], [3]], params, uniforms=torch.full((2, 10), 0.5))
    first = s.turn([3, 2])
    assert first[0] == ([9, 8, tokenizer.eos_token_id], [-0.5] * 3)  # the double's turn, cut after EOS
    assert len(first[1][0]) == 2  # its own budget
    s.keep([0])
    s.extend([[50, 51]])
    s.turn([3])
    hist, sp = llm.requests[-1]
    assert hist == [1, 2, *first[0][0], 50, 51]  # token in: the exact history, nothing re-tokenized
    assert sp["n"] == 1 and sp["max_tokens"] == 3 and sp["seed"] == int(0.5 * (2**31 - 1))


# --------------------------------------------------------------------------- trainer and eval
ENV_FILE = """
import random
from rlhf_pg.envs import EnvStep

class Coin:
    info_keys = ("flips",)
    def __init__(self, turns=2, fail=None):
        self.turns, self.n, self.fail = turns, 0, fail
    def reset(self, row):
        if self.fail == "reset":
            raise RuntimeError("no table")
        return None
    def step(self, text, token_ids):
        self.n += 1
        if self.fail == "step" and self.n == 2:
            raise ValueError("bad move")
        if self.fail == "type":
            return 42
        return EnvStep(None if self.n >= self.turns else "heads", reward=0.5, info={"flips": 1})

class NoStep:
    def reset(self, row):
        return None
"""


def env_tree(path: Path, **rollout):
    path.mkdir(parents=True, exist_ok=True)
    (path / "env.py").write_text(ENV_FILE)
    r = {"env": f"{path / 'env.py'}:Coin", "max_turns": 3, "max_episode_tokens": 64, **rollout}
    return tiny_tree(path, rollout=r)


def test_trainer_trains_on_episodes_and_logs_them(tmp_path, one_thread):
    from rlhf_pg.trainer import Trainer

    cfg = build_config(env_tree(tmp_path, env_kwargs={"turns": 2}))
    tr = Trainer(cfg)
    hist = tr.train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "episode/turns" in m]
    assert len(steps) == 2 and all(m["episode/turns"] == 2 for m in steps)
    assert all(m["episode/flips"] == 2 and 0 < m["episode/env_token_frac"] < 1 for m in steps)
    assert all(m["episode/env_reward"] == 1.0 for m in steps)  # 0.5 per turn
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [m["role"] for m in samples[0]["messages"]] == ["assistant", "user", "assistant"]
    assert "eval/reward" in hist["eval_end"]


def test_a_users_reward_sees_the_conversation_and_the_turns(tmp_path, tokenizer, one_thread):
    from rlhf_pg.trainer import Trainer

    (tmp_path).mkdir(exist_ok=True)
    (tmp_path / "rw2.py").write_text(
        "seen = []\n"
        "def turns_reward(completions, turns, completion_ids, **kw):\n"
        "    seen.append((completions, turns))\n"
        "    return [float(len(t)) for t in turns]\n"
    )
    tree = env_tree(tmp_path, env_kwargs={"turns": 2})
    tree["rewards"] = {"functions": [{"name": f"{tmp_path / 'rw2.py'}:turns_reward"}]}
    tr = Trainer(build_config(tree))
    batch = tr.rollout()
    from rlhf_pg.rewards import score_batch

    score_batch(tr.rewards, batch)
    assert batch.reward_per_function["turns_reward"].tolist() == [2.0] * batch.size
    assert batch.scores.tolist() == [3.0] * batch.size  # + the environment's 0.5 per turn
    # the function's score sits on the last action token, the environment's 0.5 on each turn's last token
    last = batch.action_mask.shape[1] - 1 - batch.action_mask.flip(-1).argmax(-1)
    assert batch.token_rewards.gather(1, last[:, None]).squeeze(1).tolist() == [2.5] * batch.size
    assert torch.allclose(batch.token_rewards.sum(-1), batch.scores)


@pytest.mark.parametrize(
    "kwargs,needles",
    [
        ({"fail": "reset"}, ["Coin", "reset()", "RuntimeError: no table"]),
        ({"fail": "step"}, ["Coin", "step() at turn 2", "ValueError: bad move"]),
        ({"fail": "type"}, ["Coin", "step() at turn 1", "returned a int", "EnvStep("]),
        ({"nope": 1}, ["rollout.env_kwargs", "TypeError"]),
    ],
)
def test_environment_errors_are_one_line_naming_the_environment_and_turn(tmp_path, kwargs, needles, one_thread):
    from rlhf_pg.trainer import Trainer

    cfg = build_config(env_tree(tmp_path, env_kwargs=kwargs))
    with pytest.raises(UserError) as e:
        Trainer(cfg).rollout()
    msg = one_line(e)
    for n in needles:
        assert n in msg, (n, msg)


def test_environment_class_problems_stop_before_the_model_loads(tmp_path, monkeypatch):
    from rlhf_pg import setup

    monkeypatch.setattr(setup, "build_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    for ref, needle in [
        ("{p}/env.py:NoStep", "no step method"),
        ("{p}/env.py:Missing", "'Missing' not found"),
        ("{p}/nofile.py:Coin", "not found"),
    ]:
        cfg = build_config(env_tree(tmp_path, env=ref.format(p=tmp_path)))
        with pytest.raises(UserError) as e:
            setup.build(cfg)
        assert needle in one_line(e)


def test_cli_exits_2_with_one_line_on_an_environment_error(tmp_path):
    import subprocess
    import sys

    import yaml

    tree = env_tree(tmp_path, env_kwargs={"fail": "step"})
    tree.pop("output_dir")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_pg",
            "train",
            str(recipe),
            f"output_dir={tmp_path / 'out'}",
            "train.eval_at_start=false",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=cpu_subprocess_env(),
    )
    assert p.returncode == 2, p.stderr
    err = [x for x in p.stderr.splitlines() if x.strip()]
    assert "Traceback" not in p.stderr and "step() at turn 2" in err[-1]


def test_config_rejects_env_and_tools_together(tmp_path):
    with pytest.raises(Exception) as e:
        build_config(env_tree(tmp_path, tools=["x.py:f"]))
    assert "exclusive" in str(e.value)


def test_the_tool_recipe_reads_its_calls_and_answers_them(monkeypatch):
    """recipes/grpo_tool_calculator.yaml: the calculator parser turns "a * b =" into a multiply call, the
    result comes back as a tool message, and the system prompt does not teach the unused tagged format."""
    from rlhf_pg.config import load_config
    from rlhf_pg.setup import environment_factory, stop_strings

    monkeypatch.chdir(ROOT)  # the recipe's paths are relative to the repository
    cfg = load_config("recipes/grpo_tool_calculator.yaml", [])
    env = environment_factory(cfg)()
    first = env.reset({"prompt": [{"role": "user", "content": "What is 315 * 364?"}]})
    assert (
        first[0]["role"] == "system" and "multiply(" in first[0]["content"] and "<tool_call>" not in first[0]["content"]
    )
    step = envs.as_env_step(env.step("315 * 364 =", [1, 2]), "tools", 0)
    assert step.observation == [{"role": "tool", "content": "<tool_response>114660</tool_response>"}]
    assert step.info == {"tool_calls": 1, "tool_errors": 0}
    assert envs.as_env_step(env.step("114660", [3]), "tools", 1).done
    assert stop_strings(cfg) == ["="]  # a user parser: no tagged stop string added


def test_default_tools_add_the_closing_tag_as_a_stop_string(tmp_path):
    from rlhf_pg.setup import stop_strings

    cfg = build_config(tiny_tree(tmp_path, rollout={"tools": [f"{ROOT}/examples/calculator_tools.py:multiply"]}))
    assert stop_strings(cfg) == ["</tool_call>"]


class AsyncSeededEnv:
    """An async environment whose reply comes from the episode's seed."""

    info_keys = ()

    async def reset(self, row, seed):
        import asyncio

        await asyncio.sleep(0)
        self.reply = random.Random(seed).choice(["red", "green", "blue"])
        return None

    async def step(self, text, token_ids):
        import asyncio

        await asyncio.sleep(0)
        reply, self.reply = self.reply, None  # one reply, then the episode ends
        return EnvStep(reply, reward=1.0 if reply is None else 0.0)


def test_async_environments_with_seeds_from_the_uniforms(tiny_model, tokenizer, one_thread):
    """Async reset/step run (concurrently); each episode's seed comes from its row of uniforms, so the
    same uniforms give the same episodes, environment replies included."""
    data = small_data(tokenizer)
    spec = spec_for(tokenizer, AsyncSeededEnv, max_turns=3, max_episode_tokens=100)
    params = SamplingParams(max_new_tokens=3)
    u = torch.rand(6, 100, generator=torch.Generator().manual_seed(9))
    be = HFBackend(tiny_model, tokenizer)
    a = sample(be, tokenizer, data, [0, 1, 2], 2, params, uniforms=u, episodes=spec)
    b = sample(be, tokenizer, data, [0, 1, 2], 2, params, uniforms=u, episodes=spec)
    assert a.messages == b.messages and torch.equal(a.completion_ids, b.completion_ids)
    replies = [m[1]["content"] for m in a.messages]
    assert set(replies) <= {"red", "green", "blue"} and len(set(replies)) > 1  # seeds differ per episode
    assert a.episode_stats["turns"].tolist() == [2.0] * 6
    assert envs.episode_seeds(u, 6) == envs.episode_seeds(u.clone(), 6)


def test_the_guessing_game_example_trains_a_step(tmp_path, one_thread):
    from rlhf_pg.trainer import Trainer

    tree = tiny_tree(
        tmp_path,
        rollout={"env": f"{ROOT}/examples/guessing_game.py:GuessingGame", "env_kwargs": {"low": 1, "high": 4}},
        rewards={"functions": []},  # the game's own per-turn rewards only
        train={"max_steps": 1, "eval_at_start": False, "save_model": False},
    )
    tr = Trainer(build_config(tree))
    m = tr.step()
    assert "episode/solved" in m and "episode/invalid" in m and m["episode/turns"] >= 1
    assert m["reward"] == m["episode/env_reward"]  # no reward functions: the game's per-turn rewards only


def test_the_vllm_backend_runs_episodes_through_the_same_runner(tokenizer):
    """sample(..., episodes=...) with VLLMBackend (its engine an in-process double): the runner, the
    segments and the masks are the backend-independent ones; only the session differs."""
    from types import SimpleNamespace

    from rlhf_pg.backends import VLLMBackend

    be = object.__new__(VLLMBackend)  # no vllm here: the engine is the double above
    be.llm, be.vllm = FakeLLM(tokenizer.eos_token_id), SimpleNamespace(SamplingParams=dict)
    be.tokenizer, be.device = tokenizer, torch.device("cpu")
    data = small_data(tokenizer)
    spec = spec_for(tokenizer, lambda: CoinEnv(turns=2), max_turns=2, max_episode_tokens=100)
    batch = sample(be, tokenizer, data, [0, 1], 2, SamplingParams(max_new_tokens=4), episodes=spec)
    assert batch.episode_stats["turns"].tolist() == [2.0] * 4
    for b in range(4):
        n = int(batch.completion_mask[b].sum())
        act = batch.action_mask[b, :n].tolist()
        first_turn = act.index(0)  # the double's turn ends at its EOS (third token)
        assert batch.completion_ids[b, first_turn - 1] == tokenizer.eos_token_id
        seg = batch.completion_ids[b, first_turn : first_turn + act[first_turn:].index(1)].tolist()
        assert seg == spec.chat.segment(batch.messages[b][1]["content"], ended_with_eos=True)
    # turn 2's request is the whole history: prompt + turn 1 + segment, as tokens
    hist, _ = be.llm.requests[-1]
    assert hist[-len(seg) :] == seg


def test_ppo_with_a_value_head_trains_on_episodes(tmp_path, one_thread):
    """The PPO preset (value head, GAE over the actions, 2 epochs of minibatches with the sampler's old
    log-probs): values, advantages and returns live on the model's tokens only."""
    from rlhf_pg.rewards import score_batch
    from rlhf_pg.trainer import Trainer

    tree = env_tree(tmp_path, env_kwargs={"turns": 2})
    tree["algo"] = {"name": "ppo", "kl_coef": 0.05}
    tree["batch"].update({"epochs": 2, "minibatch_size": 4, "micro_batch_size": 2})
    tr = Trainer(build_config(tree))
    batch = tr.rollout()
    score_batch(tr.rewards, batch)
    batch.values = tr.values(batch) * batch.action_mask
    tr.compute_advantages(batch)
    context = batch.completion_mask * (1 - batch.action_mask)
    assert context.sum() > 0
    for x in (batch.values, batch.advantages, batch.returns):  # (the value head starts at 0)
        assert (x * context).abs().sum() == 0
    assert (batch.returns * batch.action_mask).abs().sum() > 0
    m = tr.step()
    assert math.isfinite(m["value_loss"]) and m["episode/turns"] == 2


class HangingEnv:
    """Hangs in step (sync or async): rollout.env_timeout_s must stop it."""

    info_keys = ()

    def __init__(self, event=None):
        self.event = event

    def reset(self, row):
        return None

    def step(self, text, token_ids):
        self.event.wait(30)
        return None


class AsyncHangingEnv(HangingEnv):
    async def step(self, text, token_ids):
        import asyncio

        await asyncio.sleep(30)


@pytest.mark.parametrize("cls", [HangingEnv, AsyncHangingEnv], ids=["sync", "async"])
def test_an_environment_that_hangs_is_stopped_by_the_timeout(cls, tiny_model, tokenizer, one_thread):
    import threading

    release = threading.Event()
    data = small_data(tokenizer)
    spec = spec_for(tokenizer, lambda: cls(release), max_turns=2, max_episode_tokens=50)
    spec.timeout_s = 0.3
    try:
        with pytest.raises(UserError) as e:
            sample(
                HFBackend(tiny_model, tokenizer),
                tokenizer,
                data,
                [0],
                2,
                SamplingParams(max_new_tokens=2),
                episodes=spec,
            )
        msg = one_line(e)
        assert "environment 'coin' step() at turn 1 did not return within rollout.env_timeout_s=0.3 s" in msg
    finally:
        release.set()


@pytest.mark.parametrize("source", ["uniforms", "generator"])
def test_lean_decoding_samples_the_same_episodes_as_the_model_forward(tiny_model, tokenizer, one_thread, source):
    """rollout.decode=lean (rlhf_pg/decode.py: its own cache, grown as segments arrive) against the
    model's forward with a DynamicCache: the same episodes, tokens and log-probs bit for bit."""
    data = small_data(tokenizer)
    params = SamplingParams(max_new_tokens=4, temperature=1.0)
    out = {}
    for decode in ("hf", "lean"):
        spec = spec_for(tokenizer, lambda: CoinEnv(turns=3, seed=7), max_turns=3, max_episode_tokens=200)
        backend = HFBackend(tiny_model, tokenizer, decode=decode)
        assert backend.decode == decode
        u = torch.rand(6, 200, generator=torch.Generator().manual_seed(3))
        kw = {"uniforms": u} if source == "uniforms" else {"generator": torch.Generator().manual_seed(3)}
        out[decode] = sample(backend, tokenizer, data, [0, 1, 2], 2, params, episodes=spec, **kw)
    hf, lean = out["hf"], out["lean"]
    assert hf.action_mask.sum() < hf.completion_mask.sum()  # there are environment segments
    assert torch.equal(hf.completion_ids, lean.completion_ids)
    assert torch.equal(hf.action_mask, lean.action_mask)
    assert torch.equal(hf.old_logprobs, lean.old_logprobs)
