"""Exact, atomic checkpoints: everything needed to continue a run as if it had never stopped.

Layout: ``output_dir/checkpoints/step_000012/`` holding

* ``model.safetensors``   the trained module's state dict (policy, and the value head or critic if
                          any); under LoRA only the trainable tensors (adapter, value head): the
                          frozen base is reloaded from its source
* ``optimizer.pt``, ``scheduler.pt``   optimizer / LR-scheduler state (tensors and numbers only)
* ``rng_rank{r}.pt``      every RNG of process r: python, numpy, torch, the sampling generator
* ``trainer.json``        step, KL-controller and baseline state, and how many lines
                          ``metrics.jsonl`` / ``samples.jsonl`` held (resume truncates to these)

Under FSDP / DeepSpeed ZeRO-3 (sharded weights and optimizer state) the model, optimizer and
scheduler go through ``accelerator.save_state`` into ``engine/`` instead (every rank writes its
shards); the rest is the same.

A checkpoint is written into ``checkpoints/.tmp-step_…``, every file fsynced, then renamed: a
half-written checkpoint never has a ``step_*`` name, so it is never picked. The last ``keep`` are
kept. Reading uses safetensors and ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .faults import fault

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return max(steps)[1] if steps else None


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_dir():
            _fsync_tree(f)
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": repr(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    import ast

    random.setstate(ast.literal_eval(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])


def save_process_rng(tmp_dir: Path, rank: int, generator: torch.Generator) -> None:
    torch.save(rng_state(generator), tmp_dir / f"rng_rank{rank}.pt")


def tmp_dir_for(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp-step_{step:06d}"


def _module_state(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    if trainable_only:
        return {k: v.detach().cpu().contiguous() for k, v in module.named_parameters() if v.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def write_main(
    tmp: Path, module: torch.nn.Module, optimizer, scheduler, trainer_state: dict, trainable_only: bool = False
) -> None:
    """Main process: model, optimizer, scheduler and trainer state into the temporary directory."""
    state = _module_state(module, trainable_only)
    step = trainer_state.get("step")
    save_file(_untie(state), str(tmp / "model.safetensors"))
    fault("ckpt-after-model", step)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    fault("ckpt-after-optimizer", step)
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "trainer.json").write_text(json.dumps(trainer_state))


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): store copies."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def commit(output_dir: str | Path, step: int, keep: int) -> Path:
    """fsync the temporary directory, rename it to ``step_…`` and prune old checkpoints."""
    tmp = tmp_dir_for(output_dir, step)
    _fsync_tree(tmp)
    final = checkpoint_root(output_dir) / f"step_{step:06d}"
    if final.exists():
        shutil.rmtree(final)
    fault("ckpt-before-rename", step)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fault("ckpt-after-rename", step)
    complete = sorted((int(m.group(1)), p) for p in final.parent.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in final.parent.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load(
    ckpt: Path,
    module: torch.nn.Module,
    optimizer,
    scheduler,
    rank: int,
    generator: torch.Generator,
    trainable_only: bool = False,
) -> dict:
    """Restore everything saved by :func:`write_main` / :func:`save_process_rng`; returns trainer state."""
    state = load_file(str(ckpt / "model.safetensors"), device=str(next(module.parameters()).device))
    if trainable_only:
        expected = {k for k, v in module.named_parameters() if v.requires_grad}
        if set(state) != expected:
            raise UserError(
                f"checkpoint {ckpt} holds other trainable tensors than this model "
                f"({len(set(state) ^ expected)} differ): was it written with another model.lora?"
            )
        module.load_state_dict(state, strict=False)
    else:
        module.load_state_dict(state, strict=True)
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return load_trainer_state(ckpt, rank, generator)


def load_trainer_state(ckpt: Path, rank: int, generator: torch.Generator) -> dict:
    """This process's RNG states and the trainer state (step, controllers, line counts)."""
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True), generator)
    return json.loads((ckpt / "trainer.json").read_text())


def truncate_lines(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` lines of a JSONL file (drop records written after the checkpoint)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) != n_lines:
        path.write_text("".join(lines[:n_lines]))


def count_lines(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)
