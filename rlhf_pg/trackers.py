"""Experiment trackers through Accelerate's tracking integration (``train.report_to``).

Accelerate owns the clients (TensorBoard, W&B, Trackio, MLflow, ...); this module only checks the
choice before any model is loaded, makes the trackers that need a network safe offline, flattens the
resolved config into hyper-parameters, and keeps the numbers a tracker can plot.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from .config import RunConfig
from .errors import UserError

PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
    "comet_ml": "comet_ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
}
"""Accelerate's tracker names → the package each needs."""


def check_trackers(cfg: RunConfig, say=print) -> list[str]:
    """The validated ``train.report_to`` list (one line for an unknown or missing tracker). W&B without
    an API key or an explicit WANDB_MODE runs offline (files under output_dir), never failing mid-run."""
    names = list(cfg.train.report_to)
    for name in names:
        if name not in PACKAGES:
            raise UserError(f"train.report_to: unknown tracker {name!r}; known: {', '.join(PACKAGES)}")
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise UserError(f"train.report_to: {name} needs the {PACKAGES[name]} package: pip install {PACKAGES[name]}")
    if "wandb" in names and not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", cfg.output_dir)
        say("wandb: no WANDB_API_KEY or WANDB_MODE: logging offline under output_dir (sync later with 'wandb sync')")
    return names


def hyperparameters(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config flattened to dotted keys with scalar values (what every tracker accepts)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)

    walk("", cfg.model_dump(mode="json"))
    return {k: ("null" if v is None else v) for k, v in out.items()}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl record (trackers plot numbers; `step` is the x axis)."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and v is not None}
