"""Evaluation: pass@k on hand cases; greedy/sampled metrics equal a hand count on scripted
completions; shards add up; the eval command works on an alias, a run directory and a LoRA adapter."""

import json
import math
from types import SimpleNamespace

import datasets
import pytest
import torch

from rlhf_pg import evaluate as ev
from rlhf_pg import rollout
from rlhf_pg.batch import Batch
from rlhf_pg.cli import main
from rlhf_pg.config import build_config, dump_config
from rlhf_pg.errors import UserError
from rlhf_pg.evaluate import evaluate_policy, pass_at_k, pass_ks
from rlhf_pg.rewards import RewardSet, RewardSpec
from rlhf_pg.rollout import left_pad

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ pass@k
def test_pass_at_k_hand_cases():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(4, 0, 4) == 0.0  # c = 0
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(3, 3, 3) == 1.0  # n = k, c ≥ 1
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 = c/n
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 − C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 − C(3,2)/C(4,2) = 1 − 3/6
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)
    assert pass_ks(1) == [1] and pass_ks(5) == [1, 2, 4, 5] and pass_ks(8) == [1, 2, 4, 8]


# ------------------------------------------------------------------- scripted completions, hand count
QUESTIONS = ["1+3", "2+4", "5+5"]
ANSWERS = ["4", "6", "10"]
GREEDY = {"1+3": "4", "2+4": "7", "5+5": "the answer is 10"}
SAMPLED = {"1+3": ["4", "4", "4", "4"], "2+4": ["6", "1", "2", "3"], "5+5": ["1", "2", "x", "9"]}


class FakeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(use_cache=False)


def _dataset(tokenizer):
    ids = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in QUESTIONS]
    return datasets.Dataset.from_dict(
        {"prompt": QUESTIONS, "prompt_text": QUESTIONS, "prompt_ids": ids, "answer": ANSWERS}
    )


def _scripted_generate(tokenizer):
    by_ids = {tuple(tokenizer(q, add_special_tokens=False)["input_ids"]): q for q in QUESTIONS}

    def fake(model, tok, prompts, group_size, params, generator=None, uniforms=None, decode="hf"):
        fake.modes.append((model.training, model.config.use_cache))
        texts = []
        for p in prompts:
            q = by_ids[tuple(p)]
            texts += [GREEDY[q]] * group_size if params.temperature == 0 else SAMPLED[q][:group_size]
        rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), tok.pad_token_id)
        mask = torch.zeros(len(rows), T)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        pids, pmask = left_pad(prompts, tok.pad_token_id)
        return Batch(
            pids.repeat_interleave(group_size, 0),
            pmask.repeat_interleave(group_size, 0),
            ids,
            mask,
            torch.zeros_like(mask),
            group_size,
        )

    fake.modes = []
    return fake


def _rewards():
    return RewardSet([RewardSpec("accuracy", 1.0), RewardSpec("format", 0.5)])


def test_metrics_match_a_hand_count(tokenizer, monkeypatch):
    fake = _scripted_generate(tokenizer)
    monkeypatch.setattr(rollout, "generate", fake)
    model = FakeModel()  # config.use_cache=False, train mode
    res = evaluate_policy(
        model,
        tokenizer,
        _dataset(tokenizer),
        _rewards(),
        max_new_tokens=8,
        batch_size=2,
        k=2,
        n_samples=4,
        keep_samples=True,
    )
    # sampled through HFBackend: eval mode with the KV cache on during each call, both restored after
    assert len(fake.modes) == 2 + 3 and set(fake.modes) == {(False, True)}  # greedy: 2 batches; sampled: 3
    assert model.training and model.config.use_cache is False
    m = res.metrics
    # greedy: "4" (correct, bare number) | "7" (wrong, bare) | "the answer is 10" (correct, not bare)
    assert m["eval/n"] == 3
    assert m["eval/accuracy"] == pytest.approx(2 / 3)
    assert m["eval/reward/accuracy"] == pytest.approx(2 / 3)
    assert m["eval/reward/format"] == pytest.approx(2 / 3)
    assert m["eval/reward"] == pytest.approx((1.5 + 0.5 + 1.0) / 3)
    lens = [len(tokenizer(GREEDY[q], add_special_tokens=False)["input_ids"]) + 1 for q in QUESTIONS]
    assert m["eval/completion_len"] == pytest.approx(sum(lens) / 3)
    # sampled, n = 4: correct counts c = 4, 1, 0
    assert m["eval/sampled/accuracy"] == pytest.approx(5 / 12)
    assert m["eval/pass@1"] == pytest.approx((1 + 0.25 + 0) / 3)
    assert m["eval/pass@2"] == pytest.approx((1 + 0.5 + 0) / 3)  # 1 − C(3,2)/C(4,2) = 0.5 for c = 1
    assert m["eval/sampled/reward/format"] == pytest.approx(11 / 12)  # every sample is a bare number but "x"
    assert m["eval/sampled/reward"] == pytest.approx((5 + 0.5 * 11) / 12)
    assert m["eval/samples_per_prompt"] == 4
    assert len(res.samples) == 3 + 12
    greedy = [s for s in res.samples if s["decoding"] == "greedy"]
    assert [s["correct"] for s in greedy] == [True, False, True]
    assert [s["completion"] for s in greedy] == [GREEDY[q] for q in QUESTIONS]


def test_shards_add_up_and_reduce_gives_global_means(tokenizer, monkeypatch):
    monkeypatch.setattr(rollout, "generate", _scripted_generate(tokenizer))
    kw = dict(max_new_tokens=8, batch_size=4, k=2, n_samples=4)
    data, rw = _dataset(tokenizer), _rewards()
    full = evaluate_policy(FakeModel(), tokenizer, data, rw, **kw)
    s1 = evaluate_policy(FakeModel(), tokenizer, data, rw, shard=(1, 2), **kw)
    other = torch.stack(list(s1.sums.values()))
    s0 = evaluate_policy(FakeModel(), tokenizer, data, rw, shard=(0, 2), reduce=lambda t: t + other, **kw)
    for key in full.sums:
        torch.testing.assert_close(full.sums[key], s0.sums[key] + s1.sums[key])
    assert s0.metrics == pytest.approx(full.metrics)
    assert s1.metrics["eval/n"] == 1 and s0.metrics["eval/n"] == 3


def test_samples_must_cover_k(tokenizer):
    with pytest.raises(UserError, match="samples"):
        evaluate_policy(
            FakeModel(), tokenizer, _dataset(tokenizer), _rewards(), max_new_tokens=4, batch_size=2, k=4, n_samples=2
        )


def test_an_empty_eval_set_is_said_in_words(tokenizer):
    """Not a report of n=0 and None/nan means: one line saying there is nothing to evaluate."""
    empty = _dataset(tokenizer).select([])
    with pytest.raises(UserError, match="the eval set is empty"):
        evaluate_policy(FakeModel(), tokenizer, empty, _rewards(), max_new_tokens=4, batch_size=2)


# --------------------------------------------------------------------------------- eval command
RECIPE = (
    "model: {name: tiny-random-llama}\n"
    "data: {train: arithmetic, eval_limit: 3, task_kwargs: {n_train: 16, n_eval: 8}}\n"
    "batch: {prompts_per_step: 2, group_size: 2, eval_batch_size: 4}\n"
    "rollout: {max_new_tokens: 3}\n"
    "rewards: {functions: [{name: accuracy}, {name: length_penalty, kwargs: {target: 1, scale: 1}}]}\n"
)


def test_eval_command_on_alias_and_run_dir(tmp_path, tiny_model, tokenizer, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out = tmp_path / "ev"
    assert main(["eval", "tiny-random-llama", "--recipe", str(recipe), "--k", "2", "--out", str(out)]) == 0
    rep = json.loads((out / "eval.json").read_text())
    assert rep["eval/n"] == 3 and "eval/pass@2" in rep and "eval/sampled/reward" in rep
    rows = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 + 3 * 2
    assert "eval/accuracy" in capsys.readouterr().out

    # a run directory: its config.yaml is the default recipe, results land in the run dir
    run = tmp_path / "run"
    tiny_model.save_pretrained(run / "model")
    tokenizer.save_pretrained(run / "model")
    (run / "config.yaml").write_text(
        dump_config(build_config({"model": {"name": "tiny-random-llama"}, "data": {"eval_limit": 2}}))
    )
    assert main(["eval", str(run), "data.task_kwargs={n_train: 16, n_eval: 8}", "rollout.max_new_tokens=2"]) == 0
    rep2 = json.loads((run / "eval.json").read_text())
    assert rep2["kind"] == "run" and rep2["eval/n"] == 2 and "eval/pass@1" not in rep2


def test_eval_command_on_training_checkpoint(tmp_path, tiny_model, tokenizer):
    """A run with only checkpoints/step_N/model.safetensors (value head included) evaluates like the
    same weights saved with save_pretrained."""
    from safetensors.torch import save_file

    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(3.0)  # tied: changes the embedding too; differs from the alias
    saved = tmp_path / "saved"
    tiny_model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_000002"
    ckpt.mkdir(parents=True)
    state = {f"policy.{k}": v.detach().clone().contiguous() for k, v in tiny_model.state_dict().items()}
    state["value_head.weight"] = torch.zeros(1, 64)
    save_file(state, str(ckpt / "model.safetensors"))
    (ckpt / "trainer.json").write_text("{}")
    (run / "config.yaml").write_text(
        dump_config(
            build_config(
                {
                    "model": {"name": "tiny-random-llama"},
                    "rollout": {"max_new_tokens": 3},
                    "data": {"eval_limit": 3, "task_kwargs": {"n_train": 16, "n_eval": 8}},
                }
            )
        )
    )
    assert ev.resolve_target(str(run))["kind"] == "run"
    assert ev.resolve_target(str(ckpt))["run_dir"] == run
    assert main(["eval", str(run)]) == 0
    assert main(["eval", str(saved), "--recipe", str(run / "config.yaml"), "--out", str(tmp_path / "s")]) == 0
    a, b = (json.loads((d / "eval.json").read_text()) for d in (run, tmp_path / "s"))
    assert a["kind"] == "run" and b["kind"] == "checkpoint"
    ga, gb = (
        [json.loads(x)["completion"] for x in (d / "eval_samples.jsonl").read_text().splitlines()]
        for d in (run, tmp_path / "s")
    )
    assert ga == gb and a["eval/reward"] == b["eval/reward"]


def test_eval_command_on_lora_adapter(tmp_path, tiny_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main(["eval", str(tmp_path / "adapter"), "--recipe", str(recipe), "--out", str(tmp_path / "o")]) == 0
    rep = json.loads((tmp_path / "o" / "eval.json").read_text())
    assert rep["kind"] == "lora" and rep["eval/n"] == 3


def test_eval_command_user_errors(tmp_path, capsys):
    assert main(["eval", "tiny-random-llama"]) == 2
    assert "--recipe" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--recipe", "recipes/grpo_arithmetic.yaml"]) == 2
    assert "neither a run" in capsys.readouterr().err


def test_a_finished_run_resolves_to_its_saved_model(tmp_path):
    """A run's model/ holds config.json and (for the model card) the run's config.yaml: it is the
    run's model, not a run directory without a model."""
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    (run / "model" / "config.yaml").write_text("seed: 0\n")
    (run / "model" / "config.json").write_text("{}")
    t = ev.resolve_target(str(run))
    assert t["kind"] == "run" and t["model"] == str(run / "model") and t["run_dir"] == run


def test_eval_of_a_run_skips_a_corrupt_checkpoint(tmp_path, capsys):
    """A run without model/: the newest checkpoint whose manifest verifies is evaluated, as a resume
    would pick it; a corrupt newer one is named in a warning, not loaded."""
    from rlhf_pg import checkpoint

    run = tmp_path / "run"
    (run / "config.yaml").parent.mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    for step in (2, 4):
        ckpt = run / "checkpoints" / f"step_{step:06d}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"x" * 100)
        (ckpt / "trainer.json").write_text("{}")
        checkpoint.write_manifest(ckpt)
    newest = run / "checkpoints" / "step_000004" / "model.safetensors"
    newest.write_bytes(b"y" * 100)  # same size, other bytes: only the hash tells
    t = ev.resolve_target(str(run))
    assert t["state"] == run / "checkpoints" / "step_000002" / "model.safetensors"
    assert "step_000004 is unusable" in capsys.readouterr().err
