"""The model card written beside a trained model (``output_dir/model/README.md``), in the Hub's format.

YAML metadata (``base_model``, ``library_name``, ``tags``, ``datasets``) through ``huggingface_hub``'s
:class:`~huggingface_hub.ModelCardData`, then what a reader needs to trust and reproduce the model: the
base model, the algorithm and its effective settings, the data, the reward functions, the steps, the
held-out metrics before and after, the command that reproduces the run, and the library versions.
"""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig
from .model_cache import SMOLLM2_ALIAS, TINY_ALIAS

HUB_BASE = {SMOLLM2_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""The hub model an offline alias stands for (the alias is its Q4_1 GGUF, dequantised to fp32)."""

LIBRARIES = ("rlhf-pg", "torch", "transformers", "accelerate", "peft", "datasets")


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _metrics_table(start: dict | None, end: dict | None) -> list[str]:
    keys = [k for k in (end or {}) if k.startswith("eval/") and k != "eval/n" and isinstance(end[k], (int, float))]
    if not keys:
        return ["No held-out evaluation was logged."]
    rows = ["| metric | before training | after training |", "|---|---:|---:|"]
    for k in keys:
        before = start.get(k) if start else None
        rows.append(f"| `{k}` | {'n/a' if before is None else f'{before:.4f}'} | {end[k]:.4f} |")
    return rows + ["", f"Greedy decoding on {end.get('eval/n', '?')} held-out prompts."]


def model_card(cfg: RunConfig, steps: int, history: dict[str, Any], run_dir: str | Path) -> str:
    """The card's text: YAML metadata between ``---`` lines, then Markdown."""
    from huggingface_hub import ModelCardData

    a, m = cfg.algo, cfg.model
    base = HUB_BASE.get(m.name, None if m.name == TINY_ALIAS or Path(m.name).expanduser().exists() else m.name)
    is_hub_data = not (Path(cfg.data.train).expanduser().exists() or cfg.data.train == "arithmetic")
    data = ModelCardData(
        base_model=base,
        library_name="peft" if m.lora is not None else "transformers",
        tags=list(dict.fromkeys(["rlhf-pg", "reinforcement-learning", a.name, a.advantage])),
        datasets=[cfg.data.train] if is_hub_data else None,
    )
    settings = {k: v for k, v in a.model_dump(mode="json").items() if k != "name"}
    rewards = [
        f"- `{f.name}` (weight {f.weight:g}{', options ' + str(f.kwargs) if f.kwargs else ''})"
        for f in cfg.rewards.functions
    ]
    b = cfg.batch
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {Path(run_dir).name} — {a.name.upper()} fine-tune of {base or m.name}",
        "",
        f"Trained with [rlhf-pg](https://pypi.org/project/rlhf-pg/) for {steps} RL steps "
        f"({b.prompts_per_step} prompts × {b.group_size} completions per step, ≤ {cfg.rollout.max_new_tokens} "
        f"new tokens, temperature {cfg.rollout.temperature:g}).",
        "",
        "## Base model",
        "",
        f"`{m.name}`"
        + (
            f" — the offline alias of `{HUB_BASE[m.name]}`: its Q4_1 GGUF dequantised to float32, so "
            "the starting weights are those of the 4-bit model."
            if m.name in HUB_BASE
            else "."
        ),
        ""
        if m.lora is None
        else f"\nLoRA adapter: r={m.lora.r}, alpha={m.lora.alpha:g}, target modules {m.lora.target_modules}.",
        "",
        "## Algorithm",
        "",
        f"Preset `{a.name}`, effective settings:",
        "",
        "```yaml",
        yaml.safe_dump(settings, sort_keys=False).rstrip(),
        "```",
        "",
        "## Data",
        "",
        f"Prompts: `{cfg.data.train}` (split `{cfg.data.train_split}`); held out: "
        f"`{cfg.data.eval or cfg.data.train}` (split `{cfg.data.eval_split}`).",
        "",
        "## Rewards",
        "",
        *rewards,
        "",
        "## Held-out metrics",
        "",
        *_metrics_table(history.get("eval_start"), history.get("eval_end")),
        "",
        "## Reproduce",
        "",
        "```bash",
        f"rlhf-pg train {Path(run_dir) / 'config.yaml'} output_dir=runs/reproduced",
        "```",
        "",
        "`config.yaml` is the run's resolved configuration (seed included).",
        "",
        "## Library versions",
        "",
        *[f"- {k} {v}" for k, v in _versions().items()],
        "",
    ]
    return "\n".join(lines)


def write_model_card(path: Path, cfg: RunConfig, steps: int, history: dict[str, Any], run_dir: str | Path) -> Path:
    card = Path(path) / "README.md"
    card.write_text(model_card(cfg, steps, history, run_dir))
    return card


def check_hub_access(repo: str) -> None:
    """Before training: a push that cannot work stops now, not after the run (offline, no token)."""
    import os

    from huggingface_hub import get_token

    from .errors import UserError

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise UserError(
            f"train.push_to_hub={repo!r} but HF_HUB_OFFLINE is set: unset it, or remove train.push_to_hub "
            "and push later with 'rlhf-pg push RUN_DIR REPO'"
        )
    if get_token() is None:
        raise UserError(f"train.push_to_hub={repo!r} needs a Hub token: run 'hf auth login' or set HF_TOKEN")


def push(model_dir: str | Path, repo: str) -> str:
    """Upload ``model_dir`` (model or adapter, card, config) to the Hub model repo ``repo``; returns its URL.
    A failure is one line; the local files are never touched."""
    from huggingface_hub import create_repo, upload_folder

    from .errors import UserError, one_line

    model_dir = Path(model_dir)
    if (model_dir / "model").is_dir():  # a run directory
        model_dir = model_dir / "model"
    if not (model_dir / "config.json").is_file() and not (model_dir / "adapter_config.json").is_file():
        raise UserError(
            f"'{model_dir}' holds no saved model (config.json or adapter_config.json): pass a run "
            "directory or its model/ directory"
        )
    try:
        create_repo(repo, repo_type="model", exist_ok=True)
        info = upload_folder(
            repo_id=repo,
            folder_path=str(model_dir),
            repo_type="model",
            commit_message="Upload model trained with rlhf-pg",
        )
    except Exception as exc:  # offline, no token, no permission: all user-fixable
        raise UserError(
            f"could not push '{model_dir}' to the Hub repo '{repo}' ({type(exc).__name__}: {one_line(exc)}); "
            f"the local model is intact — retry with 'rlhf-pg push {model_dir} {repo}'"
        ) from exc
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")
