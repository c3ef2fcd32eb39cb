"""The trainer's vLLM branches, run end to end on CPU against an in-process engine double (tests/vllm_double.py):
an engine with its own copy of the weights, seeded sampling, vLLM-shaped outputs, a prefix cache and a mismatch knob.

What each test pins down (and would fail without):

* weight sync after every update, the prefix cache reset after every sync, old log-probs recomputed with the
  trainer's model while the engine's are kept as ``batch.sampler_logprobs`` (test_grpo_trains_end_to_end…);
* a synced fp32 engine reproduces the policy's log-probs to 1e-5 — full fine-tune, LoRA (merged adapter), and
  the out-of-process collective_rpc path; a stale engine or a stale prefix cache does not (test_sync_…);
* the importance-sampling correction: w ≈ 1 without a mismatch; truncated, masked and changing the gradient
  with one; bit-identical to no correction on the hf backend (test_is_…);
* two processes with vLLM are refused in one line before any model loads;
* multi-turn episodes through VLLMEpisodeSession: the engine sees the whole history as tokens, reuses its prefix
  cache across turns, and its log-probs are the trainer's on the action tokens.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import vllm_double
from vllm_double import engine_logprobs

from rlhf_pg.backends import VLLMBackend, hf_weights, vllm_outputs_to_batch, vllm_sampling_kwargs
from rlhf_pg.errors import UserError
from rlhf_pg.rollout import SamplingParams

pytestmark = pytest.mark.cpu_only(reason="the engine double runs on CPU; the trainer must too (same devices)")

ROOT = Path(__file__).parents[1]
TOL = 1e-5  # fp32 engine vs the trainer's forward (KV-cached decoding vs one full pass)


@pytest.fixture
def double(monkeypatch):
    """The vLLM double installed as ``vllm`` (no mismatch); ``double.settings`` changes later engines."""
    return vllm_double.install(monkeypatch)


def vllm_config(tiny_config, path, options=None, **sections):
    """The tiny GRPO run on the double: rollout.backend=vllm, an fp32 engine on CPU."""
    rollout = {"backend": "vllm", "backend_options": {"allow_cpu": True, "dtype": "float32", **(options or {})}}
    rollout.update(sections.pop("rollout", {}))
    train = {"eval_at_start": False, "save_model": False, **sections.pop("train", {})}
    return tiny_config(path, rollout=rollout, train=train, **sections)


def spy(tr):
    """Record, for every step of ``tr``: whether the engine held the policy's weights when it sampled, and the
    batch as the loss sees it (old log-probs, sampler log-probs, IS weights) next to the trainer's own forward
    and the engine's reported log-probs."""
    gens, steps = [], []
    generate, advantages = tr.backend.generate, tr.compute_advantages

    def spy_generate(*args, **kwargs):
        eng, pol = tr.backend.llm.model.state_dict(), tr.policy.state_dict()
        gens.append(
            {
                "synced": all(torch.equal(eng[k], pol[k].to(eng[k].dtype)) for k in eng),
                "policy": {k: v.clone() for k, v in pol.items()},
            }
        )
        return generate(*args, **kwargs)

    def spy_advantages(batch):
        mask = batch.action_mask
        lengths = batch.completion_mask.sum(-1).long().tolist()
        steps.append(
            {
                "batch": batch,
                "old": batch.old_logprobs.clone(),
                "own": tr.logprobs(tr.acc.unwrap_model(tr.model), batch) * mask,
                "sampler": None if batch.sampler_logprobs is None else batch.sampler_logprobs.clone(),
                "engine": engine_logprobs(tr.backend.llm.outputs[-1], batch.group_size, lengths),
                "is_weights": None if batch.is_weights is None else batch.is_weights.clone(),
            }
        )
        advantages(batch)

    tr.backend.generate, tr.compute_advantages = spy_generate, spy_advantages
    return gens, steps


def grads_of(tr):
    """The gradients each optimizer step of ``tr`` applies (cloned just before the step)."""
    out = []
    step = tr.optimizer.step

    def spy_step(*a, **k):
        out.append([p.grad.detach().clone() for g in tr.optimizer.param_groups for p in g["params"]])
        return step(*a, **k)

    tr.optimizer.step = spy_step
    return out


def kinds(events):
    return [e[0] for e in events]


# ------------------------------------------------------------------------------- 1. end to end


@pytest.mark.parametrize("dtype,noise", [("float32", 0.3), ("bfloat16", 0.0)])
def test_grpo_trains_end_to_end_on_the_vllm_double(tmp_path, tiny_config, monkeypatch, one_thread, dtype, noise):
    """Trainer.train() with rollout.backend=vllm: before every rollout the engine gets the policy's current
    weights (exactly; rounded to bf16 for a bf16 engine) and its prefix cache is reset; the loss sees old
    log-probs from the trainer's own forward and the engine's as sampler log-probs, whose mismatch (logit noise,
    or bf16 vs fp32) the IS correction measures."""
    from rlhf_pg.trainer import Trainer

    mod = vllm_double.install(monkeypatch, logit_noise=noise)
    steps_n = 3
    tr = Trainer(vllm_config(tiny_config, tmp_path, {"dtype": dtype}, train={"max_steps": steps_n}))
    assert isinstance(tr.backend, VLLMBackend) and tr.backend.logprobs_mode == "processed_logprobs"
    (engine,) = mod.engines
    assert engine.model is not tr.policy and engine.dtype == getattr(torch, dtype)  # its own copy of the weights
    gens, steps = spy(tr)
    hist = tr.train()
    assert "eval/reward" in hist["eval_end"]

    # one sync (all weights, lm_head skipped as tied) and one prefix-cache reset before every rollout
    assert kinds(engine.events) == ["load_weights", "reset_prefix_cache", "generate"] * steps_n
    expected = [n for n in tr.policy.state_dict() if n != "lm_head.weight"]
    assert engine.loaded == [expected] * steps_n
    assert len(gens) == steps_n and all(g["synced"] for g in gens)
    for a, b in zip(gens, gens[1:]):  # …and the policy really changed between rollouts
        assert any(not torch.equal(a["policy"][k], b["policy"][k]) for k in a["policy"])
    assert any(o.num_cached_tokens > 0 for outs in engine.outputs for o in outs)  # the cache is in use
    G = tr.cfg.batch.group_size
    for _ids, sp in engine.requests:
        assert (sp.n, sp.logprobs, sp.top_k, sp.max_tokens, sp.include_stop_str_in_output) == (G, 0, -1, 6, True)
        assert sp.seed is not None  # from the trainer's uniforms

    assert len(steps) == steps_n
    for s in steps:
        mask = s["batch"].action_mask
        assert torch.equal(s["old"], s["own"])  # old log-probs recomputed with the trainer's model
        assert s["sampler"] is not None
        for b, row in enumerate(s["engine"]):  # …the engine's kept as the sampler's, token for token
            n = len(row)
            assert torch.equal(s["sampler"][b, :n], torch.tensor(row, dtype=torch.float32))
            assert s["sampler"][b, n:].eq(0).all()
        gap = ((s["old"] - s["sampler"]) * mask).abs().max().item()
        assert 1e-3 < gap < 1.5, gap  # a real but small mismatch
        assert s["is_weights"] is not None  # auto → token-level IS with vllm


def test_ppo_epochs_train_on_the_recomputed_old_logprobs(tmp_path, tiny_config, monkeypatch, one_thread):
    """PPO (value head, KL to a frozen reference in the reward, 2 epochs × 2 minibatches: the branch where
    π_old is the batch's old log-probs, not the detached current ones) on a mismatched engine. At step 1 the
    policy IS the reference, so KL(π_old‖π_ref) is exactly 0 — only if π_old is the trainer's own forward; the
    engine's perturbed log-probs would give KL ≠ 0."""
    from rlhf_pg.trainer import Trainer

    mod = vllm_double.install(monkeypatch, logit_noise=0.3)
    cfg = vllm_config(
        tiny_config,
        tmp_path,
        algo={"name": "ppo", "kl_coef": 0.05},
        batch={"epochs": 2, "minibatch_size": 4, "micro_batch_size": 2},
    )
    tr = Trainer(cfg)
    assert tr.plan.optimizer_steps == 4 and tr.cfg.algo.kl_in == "reward"
    m1, m2 = tr.step(), tr.step()
    assert m1["kl_ref"] == 0.0 and m2["kl_ref"] > 0
    assert m1["is/ratio_max"] > 1 and all(v == v for v in (m1["value_loss"], m2["value_loss"], m2["loss"]))
    assert kinds(mod.engines[0].events) == ["load_weights", "reset_prefix_cache", "generate"] * 2


# --------------------------------------------------------------------------- 2. weight sync


def test_sync_makes_the_engine_reproduce_the_policy(tmp_path, tiny_config, double, one_thread):
    """After an update the engine samples with stale weights until the trainer syncs; after the sync its
    (tempered, processed) log-probs of the sampled tokens are the policy's own to 1e-5. Without a mismatch
    the IS ratio is 1 to that precision."""
    from rlhf_pg.trainer import Trainer

    cfg = vllm_config(tiny_config, tmp_path, rollout={"temperature": 0.7}, train={"lr": 1e-2, "max_steps": 3})
    tr = Trainer(cfg)
    m = tr.step()
    assert abs(m["is/ratio_mean"] - 1) < 1e-4 and abs(m["is/ratio_max"] - 1) < 1e-4
    assert m["is/truncated"] == 0 and m["is/masked"] == 0
    prompts = [list(p) for p in tr.train_data["prompt_ids"][:2]]
    G = tr.cfg.batch.group_size
    u = torch.rand(len(prompts) * G, 6, generator=torch.Generator().manual_seed(0))

    def gap(batch):
        own = tr.logprobs(tr.policy, batch) * batch.completion_mask
        return (own - batch.old_logprobs).abs().max().item()

    stale = tr.backend.generate(prompts, G, tr.sampling, uniforms=u)  # the update is not in the engine yet
    assert gap(stale) > 1e-4
    batch = tr.rollout()  # syncs first
    assert kinds(tr.backend.llm.events)[-3:] == ["load_weights", "reset_prefix_cache", "generate"]
    assert gap(batch) < TOL
    assert gap(tr.backend.generate(prompts, G, tr.sampling, uniforms=u)) < TOL  # same prompts, synced engine


def test_sync_resets_the_prefix_cache(tiny_model, tokenizer, double, one_thread):
    """The prefix cache holds KV computed with the old weights: a sync drops it (rlhf-pg resets it), and the
    next request recomputes with the new weights. The double keeps stale KV without a reset, as vLLM does."""
    be = VLLMBackend(tiny_model, tokenizer, allow_cpu=True, dtype="float32")
    head = "You are a careful assistant. Think step by step and answer with a number only. "
    prompts = [tokenizer(head + q, add_special_tokens=False)["input_ids"] for q in ("What is 2+3?", "And 7-4?")]
    G, params = 2, SamplingParams(max_new_tokens=5, temperature=1.0)
    u = torch.rand(len(prompts) * G, 5, generator=torch.Generator().manual_seed(1))

    def gap(batch):
        with torch.no_grad():
            full = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
            attn = torch.cat([batch.prompt_mask, batch.completion_mask.long()], 1)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            logits = tiny_model(input_ids=full, attention_mask=attn, position_ids=pos).logits.float()
        P = batch.prompt_ids.shape[1]
        lp = logits[:, P - 1 : -1].log_softmax(-1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
        return ((lp - batch.old_logprobs) * batch.completion_mask).abs().max().item()

    def cached():
        return [o.num_cached_tokens for o in be.llm.outputs[-1]]

    def perturb():
        with torch.no_grad():
            for p in tiny_model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)

    assert gap(be.generate(prompts, G, params, uniforms=u)) < TOL
    assert cached()[0] == 0 and cached()[1] >= 16  # the shared head, in whole blocks
    be.generate(prompts, G, params, uniforms=u)
    assert cached()[0] >= 16
    perturb()
    be.sync_weights(tiny_model)
    assert kinds(be.llm.events)[-2:] == ["load_weights", "reset_prefix_cache"]
    assert gap(be.generate(prompts, G, params, uniforms=u)) < TOL and cached()[0] == 0
    # what the reset prevents: new weights loaded, the cache kept → stale KV for the cached prefix
    perturb()
    be.llm.engine_model.load_weights(hf_weights(tiny_model))
    assert gap(be.generate(prompts, G, params, uniforms=u)) > 1e-4 and cached()[0] >= 16


def test_sync_of_a_lora_policy_loads_the_merged_weights(tmp_path, tiny_config, double, one_thread):
    """With LoRA the engine receives W + (α/r)·B·A under the base names (the double rejects unknown names),
    and after the sync it reproduces the adapted policy's log-probs; the adapter is unmerged again."""
    from rlhf_pg.trainer import Trainer

    lora = {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
    tr = Trainer(vllm_config(tiny_config, tmp_path, model={"lora": lora}, train={"lr": 5e-2}))
    tr.step()
    batch = tr.rollout()
    engine = tr.backend.llm
    assert engine.loaded[-1] == [n for n, _ in hf_weights(engine.model) if n != "lm_head.weight"]
    own = tr.logprobs(tr.acc.unwrap_model(tr.model), batch) * batch.completion_mask
    assert (own - batch.old_logprobs).abs().max() < TOL
    q = tr.policy.base_model.model.model.layers[0].self_attn.q_proj
    assert not q.merged
    W = q.base_layer.weight + (q.lora_B["default"].weight @ q.lora_A["default"].weight) * (4 / 2)
    got = engine.model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(got, W, atol=1e-6) and not torch.allclose(got, q.base_layer.weight, atol=1e-6)


def test_sync_through_collective_rpc_when_the_engine_is_out_of_process(tiny_model, tokenizer, monkeypatch):
    """Engine in another process (no model_executor to reach): the weights go through collective_rpc, which
    needs VLLM_ALLOW_INSECURE_SERIALIZATION=1 for a function; they arrive as copies."""
    mod = vllm_double.install(monkeypatch, in_process=False)
    be = VLLMBackend(tiny_model, tokenizer, allow_cpu=True, dtype="float32")
    assert not hasattr(be.llm.llm_engine, "model_executor")
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.up_proj.weight.mul_(2.0)
    monkeypatch.delenv("VLLM_ALLOW_INSECURE_SERIALIZATION", raising=False)
    with pytest.raises(TypeError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        be.sync_weights(tiny_model)
    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    be.sync_weights(tiny_model)
    assert kinds(be.llm.events)[-3:] == ["collective_rpc", "load_weights", "reset_prefix_cache"]
    eng = be.llm.model.state_dict()
    assert all(torch.equal(eng[k], v) for k, v in tiny_model.state_dict().items())
    assert mod.engines == [be.llm]


# -------------------------------------------------------------------------- 3. IS correction


def test_is_correction_with_a_mismatched_engine(tmp_path, tiny_config, monkeypatch, one_thread):
    """The engine samples from a perturbed policy: ratios π_old/μ spread around 1, a small is_cap truncates
    them, is_mask_above drops tokens, and the weighted policy gradient differs from the uncorrected one
    (is_correction=none) on the very same samples."""
    from rlhf_pg.trainer import Trainer

    vllm_double.install(monkeypatch, logit_noise=0.5)
    runs = {}
    for name, rollout in {
        "token": {"is_correction": "token", "is_cap": 1.05, "is_mask_above": 1.5},
        "none": {"is_correction": "none"},
    }.items():
        tr = Trainer(vllm_config(tiny_config, tmp_path / name, rollout=rollout))
        _, steps = spy(tr)
        grads = grads_of(tr)
        runs[name] = (tr.step(), steps[0], grads[0])
    (m, s, g), (m0, s0, g0) = runs["token"], runs["none"]
    assert torch.equal(s["batch"].completion_ids, s0["batch"].completion_ids)  # the same samples
    assert torch.equal(s["sampler"], s0["sampler"]) and torch.equal(s["old"], s0["old"])
    assert m["is/ratio_max"] > 1.05 and 0 < m["is/truncated"] < 1 and 0 < m["is/masked"] < 1
    assert m["is/ratio_mean"] != pytest.approx(1.0, abs=1e-3)
    assert not any(k.startswith("is/") for k in m0) and s0["is_weights"] is None
    mask = s["batch"].action_mask.bool()
    w, ratio = s["is_weights"], torch.exp(s["old"] - s["sampler"])
    assert torch.allclose(w[mask], torch.where(ratio > 1.5, 0.0, ratio.clamp(max=1.05))[mask])
    assert (w[mask] == 0).any() and (w[~mask] == 0).all()
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-8) for a, b in zip(g, g0))  # the gradient changed


def test_is_correction_on_the_hf_backend_is_bit_identical_to_none(tmp_path, tiny_config, one_thread):
    """The hf backend samples with the trainer's own model: the ratio is exactly 1, so is_correction=token
    trains bit for bit like is_correction=none."""
    from rlhf_pg.trainer import Trainer

    out = {}
    for level in ("token", "none"):
        tr = Trainer(tiny_config(tmp_path / level, rollout={"is_correction": level}, train={"max_steps": 3}))
        assert tr.backend.exact_logprobs
        start = {k: v.clone() for k, v in tr.policy.state_dict().items()}
        ms = [tr.step() for _ in range(3)]
        out[level] = (ms, {k: v.clone() for k, v in tr.policy.state_dict().items()})
    (ms, w), (ms0, w0) = out["token"], out["none"]
    for m in ms:
        assert (m["is/ratio_mean"], m["is/ratio_max"], m["is/truncated"], m["is/masked"]) == (1.0, 1.0, 0.0, 0.0)
    assert all(torch.equal(w[k], w0[k]) for k in w)
    assert [m["loss"] for m in ms] == [m["loss"] for m in ms0]
    assert any(not torch.equal(w[k], start[k]) for k in w)  # it did train


# -------------------------------------------------------------------- 4. multi-process refusal


def test_vllm_with_two_processes_is_refused_before_the_model_loads(tmp_path, tiny_config, double, monkeypatch):
    from rlhf_pg import setup
    from rlhf_pg.trainer import Trainer

    for what in ("build_policy", "build_tokenizer", "build_datasets"):
        monkeypatch.setattr(setup, what, lambda *a, _w=what, **k: pytest.fail(f"{_w} ran before the refusal"))
    double.LLM = lambda **kw: pytest.fail("an engine was built")
    cfg = vllm_config(tiny_config, tmp_path)
    with pytest.raises(UserError) as e:
        Trainer(cfg, accelerator=SimpleNamespace(num_processes=2, process_index=0, device=torch.device("cpu")))
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("rollout.backend=vllm") and "one process" in msg and "rollout.backend=hf" in msg
    setup.check_backend_processes(cfg, 1)  # one process: fine
    with pytest.raises(UserError, match="one process"):
        setup.check_backend_processes(cfg, 2)  # what the CLI can call before it launches


# ------------------------------------------------------------------------------- 5. multi-turn


def test_multi_turn_episodes_run_through_the_vllm_session(tmp_path, tiny_config, double, one_thread):
    """The guessing game on the double: every turn is one request with the episode's whole token history
    (prompt, earlier turns, the environment's segments), later turns reuse the prefix cache, and on the
    action tokens the engine's log-probs are the trainer's recomputed ones (environment tokens: none)."""
    from rlhf_pg.trainer import Trainer

    env = {"env": f"{ROOT}/examples/guessing_game.py:GuessingGame", "env_kwargs": {"low": 1, "high": 4}}
    cfg = vllm_config(
        tiny_config,
        tmp_path,
        rollout={**env, "max_turns": 3, "max_episode_tokens": 64},
        rewards={"functions": []},
        train={"max_steps": 1},
    )
    tr = Trainer(cfg)
    steps = []
    advantages = tr.compute_advantages

    def spy_advantages(batch):
        own = tr.logprobs(tr.acc.unwrap_model(tr.model), batch) * batch.action_mask
        steps.append((batch, own))
        advantages(batch)

    tr.compute_advantages = spy_advantages
    m = tr.step()
    assert m["episode/turns"] > 1
    (batch, own), engine = steps[0], tr.backend.llm
    act, real = batch.action_mask, batch.completion_mask
    assert ((real - act).sum(-1) > 0).any()  # environment segments between the turns
    assert torch.equal(batch.old_logprobs, own)
    assert (batch.sampler_logprobs * (1 - act)).abs().sum() == 0
    assert ((batch.sampler_logprobs - own) * act).abs().max() < TOL
    # every turn was one request: the prompt and everything before the turn, as tokens
    replies = {}
    for outs in engine.outputs:
        for o in outs:
            (c,) = o.outputs
            replies[tuple(o.prompt_token_ids) + tuple(c.token_ids)] = (o, c)
    turns = 0
    for b in range(batch.size):
        prompt = batch.prompt_ids[b][batch.prompt_mask[b].bool()].tolist()
        n = int(real[b].sum())
        ids, a = batch.completion_ids[b, :n].tolist(), act[b, :n].tolist()
        starts = [t for t in range(n) if a[t] == 1 and (t == 0 or a[t - 1] == 0)]
        for s in starts:
            e = next((t for t in range(s, n) if a[t] == 0), n)
            o, c = replies[tuple(prompt + ids[:e])]  # the request's prompt was the history up to turn start s
            assert list(o.prompt_token_ids) == prompt + ids[:s]
            lps = [c.logprobs[t][tok].logprob for t, tok in enumerate(c.token_ids)]
            assert batch.sampler_logprobs[b, s:e].tolist() == pytest.approx(lps, abs=0)
            turns += 1
            if s > 0:
                assert o.num_cached_tokens >= 16  # the history's blocks came from the prefix cache
    assert turns == sum(len(outs) for outs in engine.outputs)


# ------------------------------------------------------------------------------ the double itself


def test_the_double_is_as_strict_as_vllm(tiny_model, tokenizer, double, one_thread):
    """What the double checks and guarantees, on which the tests above rely: vLLM's argument names, seeds
    (sample j = seed + j), processed log-probs of the truncated distribution, stops, outputs in finish order."""
    with pytest.raises(TypeError):
        double.SamplingParams(max_new_tokens=5)  # rlhf-pg's name, not vLLM's
    with pytest.raises(TypeError):
        double.LLM(model="x", not_an_engine_arg=1)  # EngineArgs(**kwargs) first, as vLLM
    with pytest.raises(ValueError, match="top_k"):
        double.SamplingParams(top_k=-2)
    sp = double.SamplingParams(**vllm_sampling_kwargs(SamplingParams(max_new_tokens=8, stop=["e"]), 3, seed=7))
    be = VLLMBackend(tiny_model, tokenizer, allow_cpu=True, dtype="float32")
    llm, prompt = be.llm, {"prompt_token_ids": [1, 30, 40, 50]}
    (out,) = llm.generate([prompt], [sp], use_tqdm=False)
    by_index = sorted(out.outputs, key=lambda c: c.index)
    # returned in the order they finished (shorter first), not by index: consumers must sort by .index
    assert [c.index for c in out.outputs] == sorted(range(3), key=lambda j: len(by_index[j].token_ids))
    assert [c.index for c in out.outputs] != [0, 1, 2]  # (seed 7 gives three different lengths)
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) and all(list(e) == [t] for e, t in zip(c.logprobs, c.token_ids))
        if c.finish_reason == "stop":
            assert c.stop_reason == "e" and c.text.endswith("e")
            assert "e" not in tokenizer.decode(c.token_ids[:-1], skip_special_tokens=True)
        else:
            assert c.finish_reason == "length" and len(c.token_ids) == 8
    assert any(c.finish_reason == "stop" for c in out.outputs)
    b = vllm_outputs_to_batch(
        [out], [prompt["prompt_token_ids"]], 3, pad_id=2, eos_id=2, max_new_tokens=8, tokenizer=tokenizer, stop=["e"]
    )
    assert b.completion_lists() == [c.token_ids for c in by_index]  # the same cut as rlhf-pg's
    # sample 1 of seed 7 is sample 0 of seed 8
    (one,) = llm.generate([prompt], double.SamplingParams(n=1, seed=8, max_tokens=8, stop=["e"], logprobs=0))
    assert one.outputs[0].token_ids == by_index[1].token_ids
    # processed log-probs: tempered and truncated (renormalised); raw: neither
    tp = double.SamplingParams(temperature=0.5, top_p=0.5, seed=3, max_tokens=4, logprobs=0)
    (o,) = llm.generate([prompt], tp)
    c = o.outputs[0]
    with torch.no_grad():
        ids = torch.tensor([prompt["prompt_token_ids"] + c.token_ids])
        logits = tiny_model(input_ids=ids).logits[0, 3:-1].float() / 0.5
    full = logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
    got = torch.tensor([e[t].logprob for e, t in zip(c.logprobs, c.token_ids)])
    assert (got > full + 0.1).all() and (got <= 0).all()  # renormalised over the nucleus: larger
    llm.logprobs_mode = "raw_logprobs"
    (o2,) = llm.generate([prompt], tp)
    raw = (logits * 0.5).log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).squeeze(-1)
    assert o2.outputs[0].token_ids == c.token_ids
    assert torch.allclose(torch.tensor([e[t].logprob for e, t in zip(o2.outputs[0].logprobs, c.token_ids)]), raw)
