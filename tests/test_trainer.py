"""Trainer: a smoke run changes every parameter and writes reloadable outputs; β = 0 loads no
reference; gradient accumulation does not change the update; a previous run is never clobbered."""

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_pg import core
from rlhf_pg.errors import UserError
from rlhf_pg.forward import forward, forward_no_grad, with_layout
from rlhf_pg.metrics import GradNoise
from rlhf_pg.rewards import score_batch
from rlhf_pg.trainer import Trainer


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_smoke_every_parameter_changes_and_outputs_reload(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, algo={"kl_coef": 0.05, "entropy_coef": 0.01})
    tr = Trainer(cfg)
    before = _params(tr.model)
    tr.train()
    after = _params(tr.model)
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"

    out = tmp_path / "run"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    evals = [r for r in recs if "eval/reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["step"] for r in evals] == [0, 2]
    for key in (
        "reward",
        "reward_std",
        "reward/vowels",
        "kl",
        "entropy",
        "clip_low",
        "clip_high",
        "loss",
        "grad_norm",
        "lr",
        "completion_len",
        "frac_zero_std_groups",
        "tokens_per_s",
        "time/rollout",
        "time/reference",
        "time/train",
        "advantage_mean",
        "kl_coef",
    ):
        assert key in steps[0], key
    assert "eval/accuracy" in evals[0]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 8 and {"prompt", "completion", "reward", "advantage"} <= samples[0].keys()
    assert (out / "config.yaml").exists()

    # the model card: Hub metadata, the effective settings, the final held-out metrics, the command, versions
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.library_name == "transformers" and {"rlhf-pg", "grpo"} <= set(card.data.tags)
    assert f"rlhf-pg train {out / 'config.yaml'}" in card.text and (out / "model" / "config.yaml").is_file()
    assert f"| `eval/reward` | {evals[0]['eval/reward']:.4f} | {evals[-1]['eval/reward']:.4f} |" in card.text
    assert "kl_coef: 0.05" in card.text and "- transformers " in card.text and "for 2 RL steps" in card.text

    policy = tr.acc.unwrap_model(tr.model)
    device = next(policy.parameters()).device  # cuda where the trainer found a GPU
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model").to(device)
    ids = torch.tensor([[1, 2, 3, 4]], device=device)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, policy(ids).logits)


def test_beta_zero_loads_no_reference(tmp_path, tiny_config):
    tr = Trainer(tiny_config(tmp_path, algo={"kl_coef": 0.0}))
    assert tr.ref is None
    tr.reference_logprobs = lambda batch: pytest.fail("β = 0 ran a reference pass")
    m = tr.step()
    assert "kl" not in m and "kl_ref" not in m and m["time/reference"] == 0.0


def test_reference_is_frozen_copy(tmp_path, tiny_config):
    tr = Trainer(tiny_config(tmp_path, algo={"kl_coef": 0.1}))
    assert tr.ref is not None and not any(p.requires_grad for p in tr.ref.parameters())
    m = tr.step()
    assert m["kl"] == pytest.approx(0.0, abs=1e-5)  # first step: policy == reference


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant"])
def test_gradient_accumulation_gives_the_same_gradient(tmp_path, agg, tiny_config):
    """One minibatch in 1 micro-batch or in 4 (accumulated): the same gradient reaches the optimizer."""
    grads = []
    for mbs in (8, 2):
        cfg = tiny_config(
            tmp_path / f"m{mbs}",
            algo={"loss_agg": agg, "kl_coef": 0.05},
            batch={"micro_batch_size": mbs},
            train={"max_steps": 1, "eval_at_start": False},
        )
        tr = Trainer(cfg)
        seen = {}
        real_step = tr.optimizer.step

        def capture(*a, **k):
            seen.update({n: p.grad.clone() for n, p in tr.model.named_parameters()})
            return real_step(*a, **k)

        tr.optimizer.step = capture
        tr.step()
        grads.append(seen)
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)  # float summation order


def test_token_budget_micro_batches_give_the_same_gradient_and_reference(tmp_path, tiny_config):
    """batch.micro_batch_tokens: each training micro-batch within the budget (completions' tokens + each
    distinct prompt once), and the same gradient and reference log-probs (whose pass is cut by the same
    Trainer.micro_batches) as one micro-batch."""
    grads, refs, seen_mbs = [], [], []
    for budget in (None, "small"):
        cfg = tiny_config(
            tmp_path / str(budget),
            algo={"kl_coef": 0.05},
            batch={"micro_batch_size": 8},
            train={"max_steps": 1, "eval_at_start": False},
        )
        tr = Trainer(cfg)
        batch = tr.rollout()
        if budget == "small":  # about two completions per micro-batch: several micro-batches
            budget = int(batch.prompt_mask.sum(-1).max() + 2 * batch.completion_mask.shape[1])
            tr.cfg.batch.micro_batch_tokens = budget
        tr.rollout = lambda step=None, b=batch: b  # the same sampled batch for both
        got, mbs = {}, []
        real_step, real_loss, real_logprobs = tr.optimizer.step, tr.micro_batch_loss, tr.logprobs

        def capture(*a, **k):
            got.update({n: p.grad.clone() for n, p in tr.model.named_parameters()})
            return real_step(*a, **k)

        def loss(mb, n, sums):
            mbs.append(mb)
            return real_loss(mb, n, sums)

        def logprobs(model, b):
            out = real_logprobs(model, b)
            refs.append(out)
            return out

        tr.optimizer.step, tr.micro_batch_loss, tr.logprobs = capture, loss, logprobs
        tr.step()
        grads.append(got)
        seen_mbs.append((budget, mbs))
    assert len(seen_mbs[0][1]) == 1
    budget, mbs = seen_mbs[1]
    assert len(mbs) > 1 and sum(mb.size for mb in mbs) == 8
    for mb in mbs:
        uniq = {tuple(r.tolist()): m.sum().item() for r, m in zip(mb.prompt_ids, mb.prompt_mask)}
        assert sum(uniq.values()) + mb.completion_mask.sum().item() <= budget or mb.size == 1
    torch.testing.assert_close(refs[0], refs[1], atol=1e-6, rtol=1e-5)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)  # float summation order


def test_existing_run_is_not_clobbered(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, train={"max_steps": 0, "eval_at_start": False, "save_model": False})
    Trainer(cfg).train()
    with pytest.raises(UserError, match="already holds a run: resume it with --resume"):
        Trainer(cfg).train()
    Trainer(tiny_config(tmp_path, overwrite=True, train={"max_steps": 0, "save_model": False})).train()


def _layout(passes, name):
    if name == "packed-split":  # groups split over rows, one prompt copy per row
        return dataclasses.replace(with_layout(passes, "packed"), pack_tokens=3)
    return with_layout(passes, name)


def _ragged(batch, seed=0):
    """The batch with completions cut to unequal lengths (1 … T tokens; the tiny model rarely samples
    EOS), as EOS would cut them: what packing drops is the padding after the shorter ones."""
    T = batch.completion_ids.shape[1]
    n = torch.randint(1, T + 1, (batch.size,), generator=torch.Generator().manual_seed(seed))
    n[0] = T
    keep = (torch.arange(T)[None, :] < n[:, None]).float().to(batch.completion_mask.device)
    batch.completion_mask = batch.completion_mask * keep
    batch.completion_ids = batch.completion_ids.masked_fill(keep == 0, 0)
    batch.old_logprobs = batch.old_logprobs * keep
    return batch


@pytest.mark.parametrize("layout", ["packed", "packed-split", "shared prefix"])
def test_pass_layout_equals_padded_batch(tmp_path, tiny_config, layout):
    """Prompts run once per group (with completions packed or padded) give the same log-probs,
    entropies AND gradients as the padded full-sequence forward of every row."""
    cfg = tiny_config(tmp_path, train={"max_steps": 0})
    tr = Trainer(cfg)
    assert tr.passes.packed  # the default where the attention takes a custom mask (sdpa here)
    batch = _ragged(tr.rollout(0))
    lengths = batch.completion_mask.sum(-1)
    assert lengths.min() < lengths.max()  # unequal lengths: packing has padding to drop
    results = []
    for name in (layout, "padded"):
        tr.model.zero_grad()
        res = forward(tr.model, batch, _layout(tr.passes, name), with_entropy=True)
        logp, ent = res.logprobs, res.entropy
        (logp * batch.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in tr.model.named_parameters()}
        results.append((logp.detach() * batch.completion_mask, ent.detach() * batch.completion_mask, grads))
    (l1, e1, g1), (l2, e2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=0)
    torch.testing.assert_close(e1, e2, atol=1e-4, rtol=0)
    torch.testing.assert_close(l1, batch.old_logprobs, atol=1e-4, rtol=0)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-3)


def test_bf16_passes_get_bf16_logits_and_the_gradient_of_fp32_outputs(tmp_path, tiny_config):
    """Under bf16 autocast the logits reach the log-prob pass in bf16: Accelerate's wrapper casting every
    output to fp32 (a full fp32 copy of the logits in each pass, cast back in the backward) is removed in
    setup. Log-probs and gradients equal those through that wrapper, re-applied as prepare() applies it."""
    import types

    from accelerate.utils import convert_outputs_to_fp32

    tr = Trainer(tiny_config(tmp_path, train={"max_steps": 0, "mixed_precision": "bf16"}))
    module = tr.acc.unwrap_model(tr.model)
    assert "_original_forward" not in module.__dict__
    batch = _ragged(tr.rollout(0))
    with tr.passes.autocast():
        assert module(input_ids=batch.prompt_ids[:2]).logits.dtype == torch.bfloat16

    def pass_and_grads():
        tr.model.zero_grad()
        logp = forward(tr.model, batch, tr.passes, with_entropy=True).logprobs
        (logp * batch.completion_mask).sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in tr.model.named_parameters()}

    logp, grads = pass_and_grads()
    module.forward = types.MethodType(convert_outputs_to_fp32(type(module).forward), module)
    with tr.passes.autocast():
        assert module(input_ids=batch.prompt_ids[:2]).logits.dtype == torch.float32
    logp_fp32_outputs, grads_fp32_outputs = pass_and_grads()
    assert torch.equal(logp, logp_fp32_outputs)
    for n, g in grads.items():
        torch.testing.assert_close(g, grads_fp32_outputs[n], atol=1e-6, rtol=1e-4, msg=n)


def _weight_casts(model, fn):
    """(fn's result, how many times each fp32 weight of ``model`` was cast to another dtype while fn ran)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    weights = {p.data_ptr(): n for n, p in model.named_parameters() if p.dtype == torch.float32}
    casts: Counter = Counter()

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            x = args[0] if args else None
            if func is torch.ops.aten._to_copy.default and isinstance(x, torch.Tensor) and x.dtype == torch.float32:
                if x.data_ptr() in weights:
                    casts[weights[x.data_ptr()]] += 1
            return func(*args, **(kwargs or {}))

    with CountCasts():
        out = fn()
    return out, casts


def test_weight_casts_kept_casts_each_weight_once_per_pass_and_update(tmp_path, tiny_config, monkeypatch):
    """Under bf16 autocast the reference pass (frozen weights) and the micro-batches of one update cast each
    weight once, not once per micro-batch; the log-probs and the update are the same as with a cast per
    micro-batch, and the reference stays frozen."""
    import contextlib

    from rlhf_pg import forward as fwd
    from rlhf_pg import trainer as trainer_module

    def trainer(name: str) -> Trainer:
        cfg = tiny_config(
            tmp_path / name,
            algo={"name": "grpo", "kl_coef": 0.05},
            batch={"micro_batch_size": 1},  # one completion per micro-batch
            train={"max_steps": 1, "mixed_precision": "bf16", "eval_at_start": False},
        )
        return Trainer(cfg)

    tr = trainer("kept")
    assert tr.ref is not None
    batch = tr.rollout(0)
    assert batch.size >= 4
    ref_pass = lambda: fwd.forward_no_grad(tr.ref, batch, tr.passes, 1).logprobs  # noqa: E731
    kept, casts = _weight_casts(tr.ref, ref_pass)
    assert casts and max(casts.values()) == 1, casts
    assert not any(p.requires_grad for p in tr.ref.parameters())
    # a whole RL step (Trainer.optimizer_step's own block): the policy's weights are cast once for the
    # rollout and once for the update's micro-batches
    _, casts = _weight_casts(tr.model, tr.step)
    assert casts and max(casts.values()) == 2, casts

    no_block = lambda *models: contextlib.nullcontext()  # noqa: E731
    monkeypatch.setattr(fwd, "weight_casts_kept", no_block)
    monkeypatch.setattr(trainer_module, "weight_casts_kept", no_block)
    per_micro_batch, casts = _weight_casts(tr.ref, ref_pass)
    assert min(casts.values()) == batch.size  # what the block saves: a cast per micro-batch
    assert torch.equal(kept, per_micro_batch)
    plain = trainer("per-micro-batch")
    _, casts = _weight_casts(plain.model, plain.step)
    assert min(casts.values()) == 1 + batch.size
    for (n, p), q in zip(tr.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(p, q), n  # the same update


def _reference_in_header(tr: Trainer) -> str:
    from rlhf_pg.setup import describe

    return describe(tr.cfg, tr.components).split("reference=")[1].split("\n")[0]


def check_reference_storage(tr: Trainer) -> None:
    """``tr`` runs in bf16 autocast: its reference keeps the nn.Linear weights in bf16 and the tied embedding /
    LM head and the norms in fp32, and its log-probs are bit-equal to those of the fp32 reference."""
    from rlhf_pg.models import load_model

    assert _reference_in_header(tr) == "frozen model (linear weights in bfloat16, as autocast casts them)"
    dtypes = {n: p.dtype for n, p in tr.ref.named_parameters()}
    linear = [n for n, m in tr.ref.named_modules() if type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16]
    assert len(linear) == 7 * tr.ref.config.num_hidden_layers  # q k v o gate up down; the tied LM head is not
    assert dtypes["model.embed_tokens.weight"] == torch.float32 and tr.ref.lm_head.weight.dtype == torch.float32
    assert {d for n, d in dtypes.items() if "norm" in n} == {torch.float32}
    fp32_ref = load_model(tr.cfg.model.name, "float32", tr.acc.device).eval().requires_grad_(False)
    assert sum(p.numel() * p.element_size() for p in tr.ref.parameters()) < sum(
        p.numel() * p.element_size() for p in fp32_ref.parameters()
    )
    batch = _ragged(tr.rollout(0))
    for layout in ("packed", "padded"):
        passes = _layout(tr.passes, layout)
        stored = forward_no_grad(tr.ref, batch, passes, 3).logprobs
        assert torch.equal(stored, forward_no_grad(fp32_ref, batch, passes, 3).logprobs), layout


def test_bf16_reference_stores_its_linear_weights_as_autocast_casts_them(tmp_path, tiny_config):
    """Under bf16 autocast the frozen reference keeps its nn.Linear weights in bf16 (what autocast would cast
    them to in each pass), the tied embedding / LM head and the norms in fp32: its log-probs are bit-equal to
    those of the fp32 reference, in packed and padded passes (tests/test_gpu.py runs the same check on CUDA);
    the run header says so. fp32 runs keep the reference in fp32."""
    check_reference_storage(
        Trainer(tiny_config(tmp_path / "bf16", algo={"kl_coef": 0.05}, train={"mixed_precision": "bf16"}))
    )
    plain = Trainer(tiny_config(tmp_path / "fp32", algo={"kl_coef": 0.05}, train={"mixed_precision": "no"}))
    assert {p.dtype for p in plain.ref.parameters()} == {torch.float32}
    assert _reference_in_header(plain) == "frozen model"


def test_packed_pass_of_shuffled_partial_groups(tmp_path, tiny_config):
    """A PPO minibatch holds rows of several prompts in any order and incomplete groups: packing by
    distinct prompt still gives every row its own log-probs."""
    tr = Trainer(tiny_config(tmp_path, train={"max_steps": 0}))
    batch = _ragged(tr.rollout(0), seed=1)
    rows = torch.randperm(batch.size, generator=torch.Generator().manual_seed(3))[: batch.size - 3]
    mb = batch.select(rows)
    with torch.no_grad():
        a = forward(tr.model, mb, _layout(tr.passes, "packed")).logprobs
        b = forward(tr.model, mb, _layout(tr.passes, "padded")).logprobs
    torch.testing.assert_close(a * mb.completion_mask, b * mb.completion_mask, atol=1e-4, rtol=0)


def test_packing_falls_back_where_the_attention_takes_no_custom_mask(tmp_path, tiny_config, monkeypatch):
    from rlhf_pg import forward as fwd

    monkeypatch.setattr(fwd, "PACKABLE_ATTENTION", ())
    monkeypatch.setattr("rlhf_pg.setup.PACKABLE_ATTENTION", ())
    tr = Trainer(tiny_config(tmp_path, train={"max_steps": 0}))
    assert not tr.passes.packed and tr.passes.shared_prefix


def test_ppo_value_head_trains_and_is_saved(tmp_path, tiny_config):
    cfg = tiny_config(
        tmp_path,
        algo={"name": "ppo", "kl_coef": 0.05},
        batch={"micro_batch_size": 2, "minibatch_size": 4},
        train={"max_steps": 2, "eval_at_start": False},
    )
    assert cfg.algo.advantage == "gae" and cfg.batch.epochs == 2
    tr = Trainer(cfg)
    assert tr.plan.minibatches == 2 and tr.plan.optimizer_steps == 4
    head = tr.acc.unwrap_model(tr.model).value_head
    before = head.weight.detach().clone()
    tr.train()
    assert not torch.equal(before, head.weight)
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in recs if "reward" in r][-1]
    for key in ("value_loss", "value_clip_frac", "explained_variance", "value_mean", "kl_ref", "approx_kl"):
        assert key in step, key
    assert (tmp_path / "run" / "model" / "value_head.safetensors").exists()
    # the saved policy is a plain causal LM without the value head
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert not any("value_head" in n for n, _ in reloaded.named_parameters())


@pytest.mark.parametrize("layout", ["packed", "shared prefix"])
def test_values_in_shared_prompt_passes_equal_padded_pass(tmp_path, tiny_config, layout):
    tr = Trainer(tiny_config(tmp_path, algo={"name": "ppo"}, train={"max_steps": 0}))
    with torch.no_grad():
        torch.nn.init.normal_(tr.acc.unwrap_model(tr.model).value_head.weight)
    batch = _ragged(tr.rollout(0))
    vals = []
    for name in (layout, "padded"):
        with torch.no_grad():
            res = forward(tr.model, batch, _layout(tr.passes, name))
            vals.append(res.values * batch.completion_mask)
    assert vals[0].abs().sum() > 0
    torch.testing.assert_close(vals[0], vals[1], atol=1e-4, rtol=1e-4)


DENSE_REWARD_FILE = '''
def third_token_bonus(prompts, completions, completion_ids, **kwargs):
    """Dense reward: +1 on the third completion token (if any), 0 elsewhere."""
    return [[1.0 if t == 2 else 0.0 for t in range(len(ids))] for ids in completion_ids]
'''


def test_dense_token_rewards_reach_reward_to_go(tmp_path, tiny_config):
    (tmp_path / "dense.py").write_text(DENSE_REWARD_FILE)
    cfg = tiny_config(
        tmp_path,
        algo={"name": "reinforce", "reinforce": {"baseline": "none", "reward_to_go": True}},
        rewards={"functions": [{"name": f"{tmp_path / 'dense.py'}:third_token_bonus"}]},
        train={"max_steps": 0},
    )
    tr = Trainer(cfg)
    batch = tr.rollout(0)
    score_batch(tr.rewards, batch)
    mask = batch.completion_mask
    assert batch.token_rewards[:, 2].eq(mask[:, 2]).all() and batch.token_rewards.sum() == mask[:, 2].sum()
    tr.compute_advantages(batch)
    adv = batch.advantages
    # reward-to-go: tokens 0..2 see the bonus, later tokens do not
    assert adv[:, :3].eq(1).all() and adv[:, 3:].eq(0).all()


def test_prompts_not_divisible_by_processes_is_a_clear_error(tmp_path, tiny_config):
    from types import SimpleNamespace

    cfg = tiny_config(tmp_path, batch={"prompts_per_step": 3})
    with pytest.raises(UserError, match="batch.prompts_per_step=3 is not divisible by the 2 processes"):
        Trainer(cfg, accelerator=SimpleNamespace(num_processes=2, process_index=0))


def test_gradient_noise_scale_is_logged_and_consistent(tmp_path, tiny_config):
    """With gradient accumulation the trainer logs the noise-scale estimates (finite numbers)."""
    cfg = tiny_config(
        tmp_path,
        algo={"loss_agg": "seq-mean-token-sum"},
        batch={"micro_batch_size": 2},
        train={"grad_noise_scale": True, "max_grad_norm": None, "max_steps": 1, "eval_at_start": False},
    )
    tr = Trainer(cfg)
    m = tr.step()
    assert math.isfinite(m["grad_noise_scale"]) and math.isfinite(m["grad_snr"])


def test_grad_noise_estimator_recovers_known_noise():
    """Synthetic check of the formulas: micro-batch gradients g_i = μ + noise with known tr Σ."""
    torch.manual_seed(0)
    dim, n_micro, per = 2000, 8, 4  # 8 micro-batches of 4 sequences; per-sequence noise var 1 per dim
    mu = torch.full((dim,), 0.2)
    p = torch.nn.Parameter(torch.zeros(dim))
    gn = GradNoise([p], core.AGGREGATIONS["seq-mean-token-sum"].unit, n_tok=0, n_seq=n_micro * per)
    p.grad = torch.zeros(dim)
    for _ in range(n_micro):
        g_i = mu + torch.randn(per, dim).mean(0)  # mean of `per` per-sequence gradients
        p.grad += g_i * per / (n_micro * per)  # the micro-batch's share of the minibatch gradient
        gn.after_micro_batch(torch.ones(per, 3))
    b_simple, _ = gn.estimate(float(p.grad.norm()))
    true = dim * 1.0 / float(mu.pow(2).sum())  # tr Σ / |𝒢|² = 2000 / 80 = 25
    assert 0.6 * true < b_simple < 1.6 * true


def test_critic_warmup_trains_only_the_value_function(tmp_path, tiny_config):
    """During warm-up the loss is the value loss alone: with a KL term in the loss and an entropy
    bonus (both of which move the policy), the policy stays exactly where it was; the critic learns."""
    cfg = tiny_config(
        tmp_path,
        model={"critic": "separate"},
        algo={"name": "ppo", "kl_coef": 0.1, "kl_in": "loss", "entropy_coef": 0.1, "critic_warmup_steps": 1},
        train={"max_steps": 1, "eval_at_start": False},
    )
    tr = Trainer(cfg)
    policy, critic = _params(tr.model), _params(tr.critic)
    m = tr.step()
    assert m["kl"] >= 0 and m["entropy"] > 0  # the terms were computed ...
    assert all(torch.equal(policy[n], p) for n, p in tr.model.named_parameters())  # ... but did not train
    assert any(not torch.equal(critic[n], p) for n, p in tr.critic.named_parameters())
    tr.step()  # after warm-up the policy trains
    assert any(not torch.equal(policy[n], p) for n, p in tr.model.named_parameters())


def test_estimator_metadata_not_names_drive_the_trainer(tmp_path, tiny_config):
    """A user's estimator registered under a new name, declaring needs_values, gets a value head and a
    value loss — the trainer reads metadata; it never compares an estimator's name."""
    core.ADVANTAGES.add("my_gae", dataclasses.replace(core.ADVANTAGES["gae"]))
    try:
        cfg = tiny_config(tmp_path, algo={"advantage": "my_gae", "gae": {"lam": 0.9}}, train={"max_steps": 1})
        assert cfg.algo.options("my_gae").lam == 0.95  # its options section is the one named after it
        cfg = tiny_config(tmp_path, algo={"advantage": "my_gae", "my_gae": {"lam": 0.9}}, train={"max_steps": 1})
        assert cfg.algo.options("my_gae").lam == 0.9
        tr = Trainer(cfg)
        m = tr.step()
        assert "value_loss" in m and "explained_variance" in m
        assert hasattr(tr.acc.unwrap_model(tr.model), "value_head")
    finally:
        core.ADVANTAGES.unregister("my_gae")


def test_ema_baseline_is_estimator_state_not_values(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, algo={"name": "reinforce"}, train={"max_steps": 2, "eval_at_start": False})
    assert cfg.algo.options("reinforce").baseline == "ema"
    tr = Trainer(cfg)
    m = tr.step()
    state = tr.algo.advantage_state
    assert state.value == pytest.approx(m["reward"], abs=1e-6)  # first batch: the EMA is its mean return
    assert "explained_variance" not in m and "value_loss" not in m  # no values, no value head
    assert tr.state_dict()["advantage_state"] == {"value": state.value}  # checkpointed with the run


def test_tokenizer_honours_revision_and_remote_code(tmp_path, tiny_config, monkeypatch):
    from rlhf_pg import setup

    seen = {}

    def fake_load_tokenizer(name, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(setup, "load_tokenizer", fake_load_tokenizer)
    cfg = tiny_config(tmp_path, model={"revision": "v1.2", "trust_remote_code": True})
    with pytest.raises(RuntimeError, match="stop here"):
        Trainer(cfg)
    assert seen == {"revision": "v1.2", "trust_remote_code": True}


def test_recipe_imports_register_a_users_estimator(tmp_path, tiny_config, monkeypatch):
    """`imports:` loads the user's file before validation; its estimator, options section and
    metadata then work like a built-in's (the example in docs/architecture.md)."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parents[1])
    try:
        with pytest.raises(UserError, match="batch.group_size >= 2"):  # metadata checked at load
            tiny_config(
                tmp_path,
                imports=["examples/my_estimator.py"],
                batch={"group_size": 1},
                algo={"advantage": "softmax_group"},
            )
        with pytest.raises(UserError, match="algo.softmax_group.temperature"):  # its own options section
            tiny_config(
                tmp_path,
                imports=["examples/my_estimator.py"],
                algo={"advantage": "softmax_group", "softmax_group": {"temperature": "hot"}},
            )
        cfg = tiny_config(
            tmp_path,
            imports=["examples/my_estimator.py"],
            train={"max_steps": 1},
            algo={"advantage": "softmax_group", "softmax_group": {"temperature": 0.5}},
        )
        tr = Trainer(cfg)
        batch = tr.rollout(0)
        score_batch(tr.rewards, batch)
        tr.compute_advantages(batch)
        R = batch.scores.view(-1, 4)
        want = torch.softmax(R / 0.5, dim=1) * 4 - 1
        torch.testing.assert_close(batch.advantages[:, 0], want.reshape(-1))
        assert "reward" in tr.step()
    finally:
        core.ADVANTAGES.unregister("softmax_group")
        from rlhf_pg import user_code

        user_code._plugins.clear()
    with pytest.raises(UserError, match="imports entry 'no_such_plugin_xyz'"):
        tiny_config(tmp_path, imports=["no_such_plugin_xyz"])


def test_push_to_hub_offline_stops_before_training(tmp_path, tiny_config, monkeypatch):
    """Offline (the test session sets HF_HUB_OFFLINE=1) a push cannot work: one line at start."""
    from rlhf_pg import setup

    monkeypatch.setattr(setup, "build_policy", lambda *a, **k: pytest.fail("loaded a model before the check"))
    with pytest.raises(UserError, match="train.push_to_hub='me/model' but HF_HUB_OFFLINE is set"):
        Trainer(tiny_config(tmp_path, train={"push_to_hub": "me/model"}))
    with pytest.raises(UserError, match="set train.save_model=true"):
        tiny_config(tmp_path, train={"push_to_hub": "me/model", "save_model": False})


def test_push_command_fails_in_one_line_and_keeps_the_model(tmp_path, tiny_model, tokenizer, capsys, monkeypatch):
    from rlhf_pg.cli import main

    model_dir = tmp_path / "run" / "model"
    tiny_model.save_pretrained(model_dir)
    before = sorted(p.name for p in model_dir.iterdir())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()  # drop save_pretrained's progress output
    assert main(["push", str(tmp_path / "run"), "me/model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "could not push" in err and "the local model is intact" in err
    assert sorted(p.name for p in model_dir.iterdir()) == before
    assert main(["push", str(tmp_path), "me/model"]) == 2  # no model there
    assert "holds no saved model" in capsys.readouterr().err


def test_tensorboard_event_files_hold_one_reward_point_per_step(tmp_path, tiny_config):
    """train.report_to: [tensorboard] through Accelerate: event files under output_dir, read back with
    TensorBoard's own reader, hold every step's reward and the evals; metrics.jsonl is unchanged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(tmp_path, train={"max_steps": 3, "report_to": ["tensorboard"], "save_model": False})
    Trainer(cfg).train()
    out = tmp_path / "run"
    events = [p for p in out.rglob("events.out.tfevents.*")]
    assert events, "no TensorBoard event file under output_dir"
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e for e in acc.Scalars(tag))
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "reward" in r]
    assert [e.step for e in scalars["reward"]] == [1, 2, 3]
    assert [e.value for e in scalars["reward"]] == pytest.approx([r["reward"] for r in steps])
    assert [e.step for e in scalars["eval/reward"]] == [0, 3]


def test_unknown_or_missing_tracker_is_one_line(tmp_path, tiny_config, monkeypatch):
    from rlhf_pg import setup

    monkeypatch.setattr(setup, "build_policy", lambda *a, **k: pytest.fail("loaded a model before the check"))
    with pytest.raises(UserError, match="unknown tracker 'tensorbord'"):
        Trainer(tiny_config(tmp_path, train={"report_to": ["tensorbord"]}))
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(UserError, match="wandb needs the wandb package: pip install wandb"):
        Trainer(tiny_config(tmp_path, train={"report_to": ["wandb"]}))


def test_samples_reach_trackers_with_tables(tmp_path, tiny_config, monkeypatch):
    """Trackers that have tables (Accelerate's W&B and ClearML trackers have `log_table`) get each
    step's completions as a table with the samples.jsonl columns."""
    from rlhf_pg.run_dir import RunDir

    tables = []

    class TableTracker:  # stands in for accelerate's WandBTracker (wandb is not installed here)
        name, main_process_only = "table", True

        def log_table(self, table_name, columns=None, data=None, step=None, **kw):
            tables.append((table_name, columns, data, step))

        def log(self, values, step=None, **kw):  # scalars: the TensorBoard tracker's job here
            pass

        def finish(self):
            pass

    real = RunDir.start_trackers
    monkeypatch.setattr(RunDir, "start_trackers", lambda self: (real(self), self.acc.trackers.append(TableTracker())))
    cfg = tiny_config(tmp_path, train={"max_steps": 2, "report_to": ["tensorboard"], "save_model": False})
    Trainer(cfg).train()
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [(t[0], t[3]) for t in tables] == [("samples", 1), ("samples", 2)]
    name, columns, data, _ = tables[0]
    assert {"prompt", "completion", "reward", "advantage"} <= set(columns) and len(data) == 8
    assert dict(zip(columns, data[0])) == samples[0]


def test_tracker_that_cannot_start_is_one_line_before_any_step(tmp_path, tiny_config, monkeypatch):
    """A tracker whose client fails at start (e.g. it needs a network) stops the run before step 1."""
    cfg = tiny_config(tmp_path, train={"report_to": ["tensorboard"], "eval_at_start": False})
    tr = Trainer(cfg)

    def no_network(*a, **k):
        raise ConnectionError("no route to the tracking server")

    monkeypatch.setattr(tr.acc, "init_trackers", no_network)
    monkeypatch.setattr(tr, "step", lambda: pytest.fail("trained a step"))
    with pytest.raises(UserError, match=r"a tracker failed to start \(ConnectionError: no route"):
        tr.train()


def test_data_and_reward_mistakes_stop_before_the_model_loads(tmp_path, tiny_config, monkeypatch):
    """Every check that needs only the tokenizer — data files and columns, reward functions and the
    keywords they ask for — runs before the weights are read."""
    from rlhf_pg import setup

    monkeypatch.setattr(setup, "build_policy", lambda *a, **k: pytest.fail("loaded a model before the check"))
    with pytest.raises(UserError, match="does not exist"):
        Trainer(tiny_config(tmp_path, data={"train": str(tmp_path / "missing.jsonl")}))
    with pytest.raises(UserError, match="not found"):
        Trainer(tiny_config(tmp_path, rewards={"functions": [{"name": f"{tmp_path}/rw.py:nope"}]}))
    (tmp_path / "kw.py").write_text("def needs(completion, **kw):\n    return [0.0]\n")
    with pytest.raises(UserError, match="needs keyword 'completion'"):
        Trainer(tiny_config(tmp_path, rewards={"functions": [{"name": f"{tmp_path}/kw.py:needs"}]}))


def test_a_step_without_learning_signal_is_said_in_words(tmp_path, tiny_config, capsys):
    """Every reward equal → every GRPO advantage 0: the step is marked no_signal=1, the first one is
    explained in a warning, and the run ends with the share of such steps."""
    (tmp_path / "const.py").write_text("def const(completions, **kw):\n    return [1.0] * len(completions)\n")
    tr = Trainer(tiny_config(tmp_path, rewards={"functions": [{"name": f"{tmp_path}/const.py:const"}]}))
    tr.train()
    out = capsys.readouterr()
    text = out.out + out.err
    assert text.count("every advantage is 0") == 1 and "2 step(s) (100% of max_steps) had no learning signal" in text
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["no_signal"] for m in lines if "no_signal" in m] == [1.0, 1.0]
    tr2 = Trainer(tiny_config(tmp_path / "b", train={"max_steps": 1}))  # the vowel reward varies
    assert tr2.step()["no_signal"] == 0.0


def test_every_step_logs_its_achieved_flop_rate_by_the_benchmarks_accounting(tmp_path, tiny_config):
    """perf/<phase>_gflops = the FLOPs the phase needs (metrics.step_flops, the benchmark's formula) / its
    time; perf/tokens = distinct prompt tokens (once per group) + completion tokens, over the batch."""
    from rlhf_pg import metrics
    from rlhf_pg.labs import bench

    cfg = tiny_config(tmp_path, algo={"name": "grpo", "kl_coef": 0.05}, batch={"epochs": 2})
    tr = Trainer(cfg)
    batch = tr.rollout(0)
    m = tr.step()
    n = sum(p.numel() for p in tr.model.parameters())  # tied embedding / LM head once
    assert tr.n_params == tr.n_trained == n
    G = cfg.batch.group_size
    assert m["perf/tokens"] == batch.prompt_mask[::G].sum().item() + batch.completion_mask.sum().item()
    S = m["perf/tokens"]
    for phase, flops in (("rollout", 2 * n * S), ("reference", 2 * n * S), ("train", 6 * n * S * 2)):
        assert m[f"perf/{phase}_gflops"] == pytest.approx(flops / m[f"time/{phase}"] / 1e9, rel=1e-9), phase
    assert m["perf/step_gflops"] == pytest.approx((2 + 2 + 12) * n * S / m["time/step"] / 1e9, rel=1e-9)
    step = {"prompt_tokens": 7, "completion_tokens": 5}
    assert bench.step_flops(step, n, 0.04) == metrics.step_flops(n, 7, 5, reference=True)  # one accounting
    assert metrics.step_flops(n, 7, 5, reference=False)["reference"] == 0
