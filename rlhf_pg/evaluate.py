r"""Held-out evaluation of a policy: greedy and sampled reward, accuracy and pass@k.

:func:`evaluate_policy` is a pure library function (a model, a tokenizer, a prompt dataset and a
:class:`~rlhf_pg.rewards.RewardSet` in; metrics out) used by ``rlhf-pg eval`` and by the trainer. It
works on one shard of the eval rows, ``rows[rank::world]``, and accumulates every metric as a
(sum, count) pair; pass ``reduce`` (a function summing a tensor over processes, e.g.
``Accelerator.reduce(x, "sum")``) and the means are global. One all-reduce of one tensor per call.

Metrics (prefix ``eval/``):

* greedy decoding (τ = 0), one completion per prompt: ``reward`` (weighted sum of the reward
  functions), ``reward/<name>`` (each function, ignoring ``None``), ``accuracy`` (the built-in
  ``accuracy`` rule: last number == ``answer``; only when the data has an ``answer`` column),
  ``completion_len`` (tokens, including EOS), ``n`` (prompts evaluated).
* sampled decoding (only with ``n_samples > 0``; ``k > 1`` implies ``n_samples = k``): n samples per
  prompt at the given temperature: ``sampled/reward``, ``sampled/reward/<name>``,
  ``sampled/accuracy``, ``sampled/completion_len`` (means over all n·prompts samples) and, with an
  ``answer`` column, ``pass@j`` for j = 1, 2, 4, … ≤ k and j = k, averaged over prompts with the
  unbiased estimator of Chen et al. (2021, "Evaluating Large Language Models Trained on Code", §2.1):

      pass@k = E_x [ 1 − C(n − c, k) / C(n, k) ]      n samples of prompt x, c of them correct, n ≥ k

  (the probability that at least one of k samples drawn without replacement from the n is correct;
  averaging it over prompts is unbiased for the pass@k of k fresh samples, unlike 1 − (1 − c/n)^k).

Samples whose ``accuracy`` is ``None`` (a missing answer) are left out of the accuracy means (count
with them in ``n``); for pass@k such a sample counts as not correct.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .backends import HFBackend
from .core import Reduce
from .errors import UserError, one_line
from .rewards import REWARD_REGISTRY, RewardSet, score_batch
from .rollout import SamplingParams, sample


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 − C(n−c, k)/C(n, k) (Chen et al. 2021).

    Computed as 1 − Π_{i=n−c+1}^{n} (1 − k/i), which equals the ratio of binomials without forming
    huge integers. 1 when n − c < k (every k-subset contains a correct sample), 0 when c = 0.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n samples, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_ks(k: int) -> list[int]:
    """The j of the reported pass@j: 1, 2, 4, … below k, and k."""
    js, j = [], 1
    while j < k:
        js.append(j)
        j *= 2
    return js + [k]


@dataclass
class EvalResult:
    """What :func:`evaluate_policy` returns.

    ``metrics``: name → global mean (after ``reduce``), e.g. ``eval/accuracy``, ``eval/pass@4``.
    ``sums``: name (without prefix) → tensor [Σ value, count] of THIS shard before reduction.
    ``samples``: one dict per generated completion on this shard (for ``eval_samples.jsonl``).
    """

    metrics: dict[str, float]
    sums: dict[str, torch.Tensor]
    samples: list[dict[str, Any]] = field(default_factory=list)


def _prompt_str(p: Any) -> str:
    return p if isinstance(p, str) else str(p[-1]["content"])


def _metric_keys(names: list[str], has_answer: bool, n: int, k: int, episode_keys: tuple[str, ...] = ()) -> list[str]:
    """The metric names (without prefix) in their report order: the greedy ones, then, with ``n``
    samples per prompt, the sampled ones and pass@j. The same on every process (one all-reduce).
    ``episode_keys``: the per-episode counts of multi-turn episodes (greedy only)."""
    keys = ["n", "reward", "completion_len"] + [f"reward/{x}" for x in names] + (["accuracy"] if has_answer else [])
    keys += [f"episode/{x}" for x in episode_keys]
    if n:
        keys += ["sampled/reward", "sampled/completion_len"] + [f"sampled/reward/{x}" for x in names]
        if has_answer:
            keys += ["sampled/accuracy"] + [f"pass@{j}" for j in pass_ks(k)]
    return keys


@dataclass
class _Phase:
    """One decoding of the eval rows: greedy (``tag`` "") or sampled (``tag`` "sampled/")."""

    tag: str
    params: SamplingParams
    group: int
    """Completions per prompt."""
    per_batch: int
    """Prompts per generation batch."""


def _phases(
    max_new_tokens: int, batch_size: int, stop: list[str], n: int, temperature: float, top_p: float, top_k: int
) -> list[_Phase]:
    """Greedy decoding, one completion per prompt; with ``n > 0`` also ``n`` sampled completions per
    prompt in batches of ``max(1, batch_size // n)`` prompts (about ``batch_size`` rows per pass)."""
    phases = [_Phase("", SamplingParams(max_new_tokens, 0.0, 1.0, 0, stop), 1, batch_size)]
    if n:
        phases.append(
            _Phase(
                "sampled/", SamplingParams(max_new_tokens, temperature, top_p, top_k, stop), n, max(1, batch_size // n)
            )
        )
    return phases


class _Sums:
    """Per-metric [Σ value, count] accumulators of this shard; NaN values are not counted."""

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.sums = {key: torch.zeros(2, dtype=torch.float64) for key in keys}

    def add(self, key: str, values: torch.Tensor) -> None:
        v = values.double().cpu()
        ok = ~torch.isnan(v)
        self.sums[key] += torch.stack([torch.nan_to_num(v).sum(), ok.double().sum()])


def _accuracy(batch) -> torch.Tensor:
    """Per completion: the built-in ``accuracy`` rule as float64, NaN where it gave None."""
    completions = batch.messages or batch.completions  # an episode's answer is the model's last turn
    raw = REWARD_REGISTRY["accuracy"](prompts=batch.prompts, completions=completions, **batch.columns)
    return torch.tensor([math.nan if x is None else float(x) for x in raw], dtype=torch.float64)


def _add_batch_metrics(
    sums: _Sums, phase: _Phase, batch, chunk: list[int], lengths: torch.Tensor, has_answer: bool, k: int
) -> torch.Tensor | None:
    """Accumulate one scored batch's metrics of ``phase``: reward (total and per function), length,
    accuracy and, greedy, the prompt count ``n``, or, sampled with an answer column, pass@j.
    Returns the per-completion accuracy (None without an ``answer`` column)."""
    tag, group = phase.tag, phase.group
    sums.add(f"{tag}reward", batch.scores)
    sums.add(f"{tag}completion_len", lengths)
    for name, v in batch.reward_per_function.items():
        sums.add(f"{tag}reward/{name}", v)
    acc = None
    if has_answer:
        acc = _accuracy(batch)
        sums.add(f"{tag}accuracy", acc)
    if not tag:
        sums.add("n", torch.ones(len(chunk)))
        for name, v in batch.episode_stats.items():
            sums.add(f"episode/{name}", v)
    elif has_answer:
        correct = torch.nan_to_num(acc).view(len(chunk), group).sum(1)  # (prompts,) c per prompt
        for j in pass_ks(k):
            sums.add(f"pass@{j}", torch.tensor([pass_at_k(group, int(c), j) for c in correct.tolist()]))
    return acc


def _sample_rows(
    phase: _Phase, batch, chunk: list[int], lengths: torch.Tensor, acc: torch.Tensor | None
) -> list[dict[str, Any]]:
    """One ``eval_samples.jsonl`` row per completion of the batch (``answer``/``correct`` when the
    batch has an answer column; per-function rewards that did not apply are None)."""
    out = []
    for i in range(batch.size):
        row = {
            "row": chunk[i // phase.group],
            "decoding": "sampled" if phase.tag else "greedy",
            "sample": i % phase.group,
            "prompt": _prompt_str(batch.prompts[i]),
            "completion": batch.completions[i],
            "completion_len": int(lengths[i]),
            "reward": float(batch.scores[i]),
            **{
                f"reward/{x}": (None if math.isnan(float(v[i])) else float(v[i]))
                for x, v in batch.reward_per_function.items()
            },
        }
        if batch.messages:
            row["messages"] = batch.messages[i]
            row.update({f"episode/{k}": float(v[i]) for k, v in batch.episode_stats.items()})
        if "answer" in batch.columns:
            row["answer"] = batch.columns["answer"][i]
            row["correct"] = None if math.isnan(float(acc[i])) else bool(acc[i])
        out.append(row)
    return out


def _run_phase(
    phase: _Phase,
    backend,
    tokenizer,
    dataset,
    rewards: RewardSet,
    rows: list[int],
    sums: _Sums,
    *,
    has_answer: bool,
    k: int,
    generator: torch.Generator | None,
    keep_samples: bool,
    trainer_state: Any,
    bar=None,
    episodes=None,
) -> list[dict[str, Any]]:
    """Generate, score and accumulate ``phase`` over this shard's ``rows`` in batches of
    ``phase.per_batch`` prompts; returns the per-sample rows (empty unless ``keep_samples``)."""
    samples: list[dict[str, Any]] = []
    for s in range(0, len(rows), phase.per_batch):
        chunk = rows[s : s + phase.per_batch]
        batch = sample(
            backend, tokenizer, dataset, chunk, phase.group, phase.params, generator=generator, episodes=episodes
        )
        score_batch(rewards, batch, trainer_state)
        lengths = batch.action_mask.sum(-1).float().cpu()
        acc = _add_batch_metrics(sums, phase, batch, chunk, lengths, has_answer, k)
        if keep_samples:
            samples += _sample_rows(phase, batch, chunk, lengths, acc)
        if bar is not None:
            bar.update(batch.size)
    return samples


def _reduce_metrics(sums: _Sums, device, reduce: Reduce | None, prefix: str) -> dict[str, Any]:
    """Global means ``prefix + key`` from the shards' [Σ, count] pairs (``n``: the total count of
    prompts; None where nothing was counted, e.g. a function that never applied). One all-reduce of
    one stacked (keys, 2) tensor on ``device``."""
    stacked = torch.stack([sums.sums[key] for key in sums.keys]).to(device)  # (K, 2): one all-reduce
    if reduce is not None:
        stacked = reduce(stacked)
    stacked = stacked.double().cpu()
    metrics: dict[str, Any] = {}
    for key, (total, count) in zip(sums.keys, stacked.tolist()):
        metrics[prefix + key] = int(round(total)) if key == "n" else (total / count if count else None)
    return metrics


@torch.no_grad()
def evaluate_policy(
    model,
    tokenizer,
    dataset,
    rewards: RewardSet,
    *,
    max_new_tokens: int,
    batch_size: int,
    stop: list[str] | None = None,
    k: int = 1,
    n_samples: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
    reduce: Reduce | None = None,
    prefix: str = "eval/",
    keep_samples: bool = False,
    progress: bool = False,
    trainer_state: Any = None,
    episodes=None,
) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` (rows with ``prompt_ids``, ``prompt``, ``prompt_text`` and
    the reward columns, as :func:`rlhf_pg.data.load_prompt_dataset` returns them).

    Greedy decoding always; with ``k > 1`` or ``n_samples ≥ 1`` also ``n_samples`` (default k)
    sampled completions per prompt at ``temperature``/``top_p``/``top_k`` and pass@j (needs an
    ``answer`` column). ``batch_size`` is prompts per greedy batch; sampled batches hold
    ``max(1, batch_size // n)`` prompts so a forward pass keeps about ``batch_size`` rows.

    ``shard = (rank, world)`` evaluates rows ``rank, rank + world, …``; ``reduce`` sums a tensor over
    the processes (identity when omitted). Every process must call this with the same arguments.
    Keys of ``sums`` are the same on every process (they depend only on the rewards and columns),
    so the stacked tensor can be all-reduced. Run under the caller's autocast if it uses one.
    ``episodes`` (:class:`rlhf_pg.envs.Episodes`): evaluate multi-turn episodes with the environment.
    """
    if k < 1:
        raise UserError(f"k={k}: pass@k needs k >= 1")
    if len(dataset) == 0:
        raise UserError(
            "the eval set is empty (0 prompts): nothing to evaluate — point data.eval at a dataset with rows"
        )
    n = (k if k > 1 else 0) if n_samples is None else n_samples
    if n and n < k:
        raise UserError(f"{n} samples per prompt cannot estimate pass@{k}: use --samples >= k")
    rank, world = shard
    has_answer = "answer" in dataset.column_names
    ep_keys = tuple(episodes.stat_keys) if episodes is not None else ()
    sums = _Sums(_metric_keys(list(rewards.names), has_answer, n, k, ep_keys))
    device = next(model.parameters()).device
    rows = list(range(rank, len(dataset), world))
    backend = HFBackend(model, tokenizer)
    if trainer_state is None:  # reward functions written for TRL may read it (e.g. trainer_state.global_step)
        from transformers import TrainerState

        trainer_state = TrainerState()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows) * (1 + n), desc="eval", unit="sample", dynamic_ncols=True)
    samples: list[dict[str, Any]] = []
    for phase in _phases(max_new_tokens, batch_size, list(stop or []), n, temperature, top_p, top_k):
        samples += _run_phase(
            phase,
            backend,
            tokenizer,
            dataset,
            rewards,
            rows,
            sums,
            has_answer=has_answer,
            k=k,
            generator=generator,
            keep_samples=keep_samples,
            trainer_state=trainer_state,
            bar=bar,
            episodes=episodes,
        )
    if bar is not None:
        bar.close()
    metrics = _reduce_metrics(sums, device, reduce, prefix)
    if n:
        metrics[prefix + "samples_per_prompt"] = n
    return EvalResult(metrics=metrics, sums=sums.sums, samples=samples)


# ----------------------------------------------------------------------------- the eval command
def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip("/").split("/")[-1]) or "model"


def resolve_target(target: str) -> dict[str, Any]:
    """Classify ``rlhf-pg eval``'s MODEL_OR_RUN argument.

    Returns ``{"kind", "model", "run_dir", "adapter", "state"}`` where kind is

    * ``run``: a directory with ``config.yaml`` and ``model/`` (its model), or with ``config.yaml``
      and ``checkpoints/step_*`` but no ``model/`` yet (the latest checkpoint);
    * ``checkpoint``: a training checkpoint (``model.safetensors`` + ``trainer.json``: the run's
      weights loaded into the recipe's ``model.name``), or a ``save_pretrained`` directory
      (``config.json``);
    * ``lora``: a PEFT adapter directory (``adapter_config.json``), merged into its base model;
    * ``model``: anything else — an alias or a hub id, passed on to the model loader.

    ``run_dir`` is the run whose ``config.yaml`` serves as the default recipe (None if unknown).
    """
    p = Path(target).expanduser()
    base = {"kind": "model", "model": target, "run_dir": None, "adapter": None, "state": None}
    if not p.is_dir():
        if p.exists():
            raise UserError(f"'{target}' is a file: pass a model directory, a run directory, an alias or a hub id")
        return base
    if (p / "config.yaml").is_file() and not (p / "model").is_dir() and not (p / "config.json").is_file():
        # a run without its final model (a saved model/ also holds the run's config.yaml, beside config.json)
        from .checkpoint import usable_checkpoint

        ckpt, rejected = usable_checkpoint(p, needs=("model.safetensors",))  # verified, as a resume does
        for bad, why in rejected:
            print(f"warning: checkpoint {bad} is unusable ({why}); skipped", file=sys.stderr)
        if ckpt is None:
            raise UserError(
                f"run directory '{target}' has neither model/ nor a usable checkpoint (trained with "
                "train.save_model=false?): pass a run that saved its model, or a model directory"
            )
        return {**resolve_target(str(ckpt)), "kind": "run", "run_dir": p}
    if (p / "model").is_dir():
        inner = resolve_target(str(p / "model"))
        run = (p / "config.yaml").is_file()
        return {**inner, "kind": "run" if run else inner["kind"], "run_dir": p if run else inner["run_dir"]}
    if (p / "model.safetensors").is_file() and (p / "trainer.json").is_file():
        run = p.parent.parent  # output_dir/checkpoints/step_N
        return {
            **base,
            "kind": "checkpoint",
            "model": None,
            "state": p / "model.safetensors",
            "run_dir": run if (run / "config.yaml").is_file() else None,
        }
    if (p / "adapter_config.json").is_file():
        return {**base, "kind": "lora", "model": str(p), "adapter": p}
    if (p / "config.json").is_file():
        return {**base, "kind": "checkpoint"}
    raise UserError(
        f"'{target}' is a directory but neither a run (config.yaml + model/), a model "
        "(config.json), a training checkpoint (model.safetensors + trainer.json) nor a LoRA "
        "adapter (adapter_config.json): pass one of those"
    )


def load_eval_model(target: dict[str, Any], cfg) -> tuple[Any, Any]:
    """(model, tokenizer) for a :func:`resolve_target` result.

    A LoRA adapter is merged into its base (``base_model_name_or_path`` of the adapter config when
    that exists locally or is an alias, else the recipe's ``model.name``). A training checkpoint's
    ``model.safetensors`` is loaded into the recipe's ``model.name`` (a value head, if saved, is
    dropped: evaluation needs only the policy).
    """
    from .models import load_model, load_tokenizer

    m = cfg.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if target["adapter"] is not None:
        from peft import PeftModel

        model = load_model(_adapter_base(target, cfg), m.dtype, device, m.trust_remote_code, m.revision)
        model = PeftModel.from_pretrained(model, str(target["adapter"])).merge_and_unload()
        return model, load_tokenizer(eval_tokenizer_source(target, cfg))
    if target["state"] is not None:
        from safetensors.torch import load_file

        model = load_model(m.name, m.dtype, device, m.trust_remote_code, m.revision)
        state = load_file(str(target["state"]), device=device)
        if any(k.startswith("policy.") for k in state):  # saved with a value head (PolicyWithValue)
            state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise UserError(
                f"checkpoint '{target['state'].parent}' does not fit model.name='{m.name}' ({one_line(e, 200)}): "
                "pass the recipe the run was trained with (--recipe) or its run directory"
            ) from None
        return model, load_tokenizer(m.name)
    model = load_model(target["model"], m.dtype, device, m.trust_remote_code, m.revision)
    return model, load_tokenizer(target["model"])


def _adapter_base(target: dict[str, Any], cfg) -> str:
    """The base model of a LoRA adapter: its ``base_model_name_or_path`` when that exists locally or is
    an alias, else the recipe's ``model.name``."""
    from .model_cache import ALIASES

    adapter = Path(target["adapter"])
    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not (Path(base).expanduser().exists() or base in ALIASES):
        base = cfg.model.name
    return base


def eval_tokenizer_source(target: dict[str, Any], cfg) -> str:
    """Where :func:`load_eval_model` reads the tokenizer from — loadable on its own, without weights, so
    the data and reward checks can run before any model is loaded."""
    if target["adapter"] is not None:
        adapter = Path(target["adapter"])
        return str(adapter) if (adapter / "tokenizer_config.json").is_file() else _adapter_base(target, cfg)
    if target["state"] is not None:
        return cfg.model.name
    return target["model"]


def run_eval(
    target_arg: str,
    recipe: str | None,
    overrides: list[str],
    *,
    k: int = 1,
    n_samples: int | None = None,
    out: str | None = None,
    greedy_only: bool = False,
) -> dict[str, Any]:
    """``rlhf-pg eval``: evaluate MODEL_OR_RUN on the recipe's eval split; write ``eval.json`` and
    ``eval_samples.jsonl`` into ``out`` (default: the run directory, else ``./eval_<name>``)."""
    from .config import load_config
    from .models import load_tokenizer
    from .rollout import NON_REWARD_COLUMNS
    from .setup import build_datasets, build_episodes, build_rewards, environment_factory, stop_strings

    target = resolve_target(target_arg)
    if recipe is None:
        if target["run_dir"] is None:
            raise UserError(
                "--recipe is required unless MODEL_OR_RUN is a run directory (with config.yaml) "
                "or one of its checkpoints"
            )
        recipe = str(target["run_dir"] / "config.yaml")
    cfg = load_config(recipe, list(overrides))
    torch.manual_seed(cfg.seed)
    # Everything that needs no weights first (environment, tokenizer, data, rewards), so a mistake in
    # the recipe is reported before a model is loaded.
    make_env = environment_factory(cfg)
    m = cfg.model
    tokenizer = load_tokenizer(
        eval_tokenizer_source(target, cfg), trust_remote_code=m.trust_remote_code, revision=m.revision
    )
    d = cfg.data
    _, data = build_datasets(cfg, tokenizer, train=False)
    rewards = build_rewards(cfg, tokenizer)
    rewards.check_keywords(
        [c for c in data.column_names if c not in NON_REWARD_COLUMNS], f"eval data '{d.eval or d.train}'"
    )
    episodes = build_episodes(cfg, make_env, tokenizer, data) if make_env is not None else None
    model, tokenizer = load_eval_model(target, cfg)
    r = cfg.rollout
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    res = evaluate_policy(
        model,
        tokenizer,
        data,
        rewards,
        max_new_tokens=r.max_new_tokens,
        batch_size=cfg.batch.eval_batch_size,
        stop=stop_strings(cfg),
        k=k,
        n_samples=0 if greedy_only else n_samples,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        generator=gen,
        keep_samples=True,
        progress=True,
        episodes=episodes,
    )
    if out:
        out_dir = Path(out)
    elif target["kind"] == "run":
        out_dir = target["run_dir"]
    elif target["state"] is not None and target["run_dir"] is not None:  # a checkpoint of a run
        out_dir = Path(f"eval_{_safe_name(str(target['run_dir']))}_{target['state'].parent.name}")
    else:
        out_dir = Path(f"eval_{_safe_name(target_arg)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "model": target_arg,
        "kind": target["kind"],
        "recipe": recipe,
        "overrides": list(overrides),
        "eval_data": d.eval or d.train,
        "eval_split": d.eval_split,
        "temperature": r.temperature,
        "max_new_tokens": r.max_new_tokens,
        "k": k,
        **res.metrics,
    }
    (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out_dir / "eval_samples.jsonl", "w") as f:
        for row in res.samples:
            f.write(json.dumps(row) + "\n")
    report["out_dir"] = str(out_dir)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The metrics of :func:`run_eval` as aligned text lines."""
    keys = [key for key in report if key.startswith("eval/")]
    width = max(len(key) for key in keys)
    lines = [f"{report['model']} ({report['kind']}) on {report['eval_data']}:{report['eval_split']}"]
    for key in keys:
        v = report[key]
        lines.append(f"  {key:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {key:<{width}}  {v}")
    lines.append(f"  wrote {Path(report['out_dir']) / 'eval.json'} and eval_samples.jsonl")
    return "\n".join(lines)
