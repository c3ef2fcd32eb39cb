"""The run directory: output-dir policy, resume, checkpoint orchestration, logs, final save, signals.

``output_dir/`` holds ``config.yaml``, ``metrics.jsonl``, ``samples.jsonl``, ``checkpoints/step_*``
(see :mod:`rlhf_pg.checkpoint` for their layout and atomicity) and, at the end, ``model/``.

* A run holds a lock on its ``output_dir`` (``.rlhf-pg.lock``, an ``flock`` the kernel drops when the
  process dies, so a killed run leaves nothing stuck); a second run into a directory in use stops with
  one line. :func:`check_output_dir` makes the checks that need no model (the CLI runs it first).
* A fresh run refuses an ``output_dir`` that already holds a run (unless ``overwrite``); a resumed
  run loads the latest complete checkpoint and cuts ``metrics.jsonl``/``samples.jsonl`` back to the
  lines they held when it was written, so every step is logged exactly once.
* Checkpoints hold the trained modules, optimizer and scheduler (sharded engines: every rank writes
  its shards), every process's RNGs and the trainer's small state (step, estimator state, KL
  controller).
* SIGINT/SIGTERM finish the current step, write a checkpoint and stop (:class:`Interrupted`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from . import checkpoint
from .config import RunConfig, dump_config
from .distributed import sharding_kind
from .errors import UserError, one_line
from .faults import fault
from .model_card import push, write_model_card
from .setup import Components, bare_policy
from .trackers import hyperparameters, scalars

LOCK_NAME = ".rlhf-pg.lock"


def _already_a_run(out: Path) -> UserError:
    return UserError(
        f"output_dir '{out}' already holds a run: resume it with --resume, replace it with overwrite=true, "
        "or choose another output_dir"
    )


def check_output_dir(cfg: RunConfig) -> None:
    """The run-directory checks that need no model: not a previous run (unless ``overwrite`` or
    ``resume``), and not in use by a live run. Cheap; run before anything is loaded."""
    out = Path(cfg.output_dir)
    if not (cfg.overwrite or cfg.train.resume) and (out / "metrics.jsonl").exists():
        raise _already_a_run(out)
    holder = lock_holder(out)
    if holder is not None:
        raise _in_use(out, holder)


def _in_use(out: Path, holder: str) -> UserError:
    return UserError(
        f"output_dir '{out}' is in use by a running rlhf-pg ({holder}): wait for it to finish or stop it, "
        "or choose another output_dir"
    )


def lock_holder(out: Path) -> str | None:
    """Who holds ``out``'s run lock ("pid N"), or None when nobody does (no file, or a dead holder).
    Probes with a shared lock, so that probes (e.g. the processes of one launch) never see each other."""
    import fcntl

    path = out / LOCK_NAME
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "pid unknown"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


class DirLock:
    """An exclusive ``flock`` on ``out/.rlhf-pg.lock`` holding this process's pid. The kernel releases
    it when the process exits in any way (SIGKILL included): a stale file is never a stuck lock."""

    def __init__(self, out: Path):
        import fcntl

        out.mkdir(parents=True, exist_ok=True)
        self.f = open(out / LOCK_NAME, "a+")  # noqa: SIM115 (held for the run's life)
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.f.seek(0)
            holder = self.f.read().strip() or "pid unknown"
            self.f.close()
            raise _in_use(out, holder) from None
        self.f.seek(0)
        self.f.truncate()
        self.f.write(f"pid {os.getpid()}")
        self.f.flush()

    def release(self) -> None:
        if not self.f.closed:
            self.f.close()  # closing drops the flock


class Interrupted(Exception):
    """SIGINT/SIGTERM stopped the run after a step; a checkpoint was written."""

    def __init__(self, step: int, path: Path, signum: int):
        super().__init__(f"stopped after step {step}; checkpoint {path}")
        self.step, self.path, self.signum = step, path, signum


class RunDir:
    def __init__(self, cfg: RunConfig, c: Components):
        self.cfg, self.c, self.acc = cfg, c, c.acc
        self.out, self.rank = Path(cfg.output_dir), c.acc.process_index
        self.lock: DirLock | None = None

    def release(self) -> None:
        """Drop the run lock (end of :meth:`Trainer.train`, however it ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def print(self, msg: str) -> None:
        if self.acc.is_main_process:
            tqdm.write(msg)

    def log(self, record: dict) -> None:
        """One metrics record: a metrics.jsonl line and, with train.report_to, the trackers' point."""
        self.write_jsonl("metrics.jsonl", [record])
        if self.cfg.train.report_to:
            self.acc.log(scalars(record), step=int(record["step"]))

    def log_samples(self, rows: list[dict], step: int) -> None:
        """A step's completions: samples.jsonl, and a table in every tracker that has tables (W&B, ClearML)."""
        self.write_jsonl("samples.jsonl", rows)
        if not (self.cfg.train.report_to and rows and self.acc.is_main_process):
            return
        columns = list(dict.fromkeys(k for row in rows for k in row))
        data = [[row.get(c) for c in columns] for row in rows]
        for tracker in self.acc.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table("samples", columns=columns, data=data, step=step)

    def start_trackers(self) -> None:
        """Start the trackers before the first step; one that cannot start (e.g. needs a network) is one line."""
        if self.cfg.train.report_to:
            try:
                self.acc.init_trackers(self.out.name or "rlhf-pg", config=hyperparameters(self.cfg))
            except Exception as exc:
                raise UserError(
                    f"train.report_to={self.cfg.train.report_to}: a tracker failed to start ({type(exc).__name__}: "
                    f"{one_line(exc)}) — fix its setup (network, login) or remove it from train.report_to"
                ) from exc

    def end_trackers(self) -> None:
        if self.cfg.train.report_to:
            self.acc.end_training()

    def write_jsonl(self, name: str, rows: list[dict]) -> None:
        """Append rows to ``output_dir/name`` (main process; the rows are already gathered)."""
        if self.acc.is_main_process and rows:
            self.out.mkdir(parents=True, exist_ok=True)
            with open(self.out / name, "a") as f:
                for row in rows:
                    line = json.dumps(row) + "\n"
                    if name == "metrics.jsonl" and os.environ.get("RLHF_PG_FAULT"):
                        f.write(line[: len(line) // 2])  # a torn line, as a crash mid-write leaves it
                        f.flush()
                        fault("metrics-mid-line", row.get("step"))
                        line = line[len(line) // 2 :]
                    f.write(line)

    @contextlib.contextmanager
    def progress(self, total: int, initial: int):
        """A progress bar over the run's steps (main process only); ``bar.show(metrics)`` after a step."""
        bar = tqdm(total=total, initial=initial, desc="train", disable=not self.acc.is_main_process, dynamic_ncols=True)

        def show(m: dict) -> None:
            bar.update(1)
            bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m.get('kl', 0.0):.4f}", len=f"{m['completion_len']:.0f}")

        bar.show = show
        try:
            yield bar
        finally:
            bar.close()

    def logged_eval(self, step: int) -> dict | None:
        """The eval record of ``step`` already in metrics.jsonl (a resumed run does not re-evaluate)."""
        path = self.out / "metrics.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            rec = json.loads(line)
            if "eval/n" in rec and rec["step"] == step:
                return rec
        return None

    # ------------------------------------------------------------------------------ start / resume
    def prepare(self, generator: torch.Generator) -> dict | None:
        """Fresh run: refuse to clobber a previous one. Resume: load the latest complete checkpoint
        (restoring ``generator``) and return the trainer state it holds; None for a fresh start."""
        cfg = self.cfg
        if self.acc.is_main_process:
            self.lock = DirLock(self.out)  # before anything in the directory is read or removed
        ckpt = checkpoint.latest_checkpoint(self.out) if cfg.train.resume else None
        state = None
        if ckpt is not None:
            if (ckpt / "engine").is_dir():  # written under FSDP / ZeRO-3
                self.acc.load_state(str(ckpt / "engine"))
                state = checkpoint.load_trainer_state(ckpt, self.rank, generator)
            else:
                state = checkpoint.load(
                    ckpt,
                    self._checkpointed_module(),
                    self.c.optimizer,
                    self.c.scheduler,
                    self.rank,
                    generator,
                    trainable_only=cfg.model.lora is not None,
                )
            if self.acc.is_main_process:
                checkpoint.truncate_lines(self.out / "metrics.jsonl", state["metrics_lines"])
                checkpoint.truncate_lines(self.out / "samples.jsonl", state["samples_lines"])
            self.print(f"resumed from {ckpt} (step {state['step']})")
        elif (self.out / "metrics.jsonl").exists() and not (cfg.overwrite or cfg.train.resume):
            raise _already_a_run(self.out)  # checked on every process, so none is left waiting for the others
        elif self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "samples.jsonl"):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(checkpoint.checkpoint_root(self.out), ignore_errors=True)
        if self.acc.is_main_process:
            (self.out / "config.yaml").write_text(dump_config(cfg))
        self.acc.wait_for_everyone()
        return state

    # --------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, trainer_state: dict[str, Any], generator: torch.Generator) -> Path:
        """Atomically write everything needed to resume exactly after ``step`` (see checkpoint.py)."""
        acc, c = self.acc, self.c
        tmp = checkpoint.tmp_dir_for(self.out, step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        checkpoint.save_process_rng(tmp, self.rank, generator)
        sharded = sharding_kind(c.model) != "none"
        if sharded:  # every rank writes its shards of model, optimizer and scheduler
            acc.save_state(str(tmp / "engine"))
        if acc.is_main_process:
            state = {
                **trainer_state,
                "step": step,
                "metrics_lines": checkpoint.count_lines(self.out / "metrics.jsonl"),
                "samples_lines": checkpoint.count_lines(self.out / "samples.jsonl"),
            }
            if sharded:
                (tmp / "trainer.json").write_text(json.dumps(state))
            else:
                checkpoint.write_main(
                    tmp,
                    self._checkpointed_module(),
                    c.optimizer,
                    c.scheduler,
                    state,
                    trainable_only=self.cfg.model.lora is not None,
                )
        acc.wait_for_everyone()
        final = checkpoint.checkpoint_root(self.out) / f"step_{step:06d}"
        if acc.is_main_process:
            final = checkpoint.commit(self.out, step, self.cfg.train.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _checkpointed_module(self) -> torch.nn.Module:
        """What a checkpoint's model.safetensors holds: the trained module (and the critic)."""
        model = self.acc.unwrap_model(self.c.model)
        if self.c.critic is None:
            return model
        return torch.nn.ModuleDict({"policy": model, "critic": self.acc.unwrap_model(self.c.critic)})

    # ---------------------------------------------------------------------------------- final save
    def save_model(self, path: Path, history: dict | None = None, steps: int = 0) -> None:
        """The policy with save_pretrained (under LoRA: the adapter, loadable with peft, and with
        ``model.lora.save_merged`` the merged model in ``path/merged``), its tokenizer, the value
        head (``value_head.safetensors``) or the separate critic (``path/critic``)."""
        acc, c = self.acc, self.c
        acc.wait_for_everyone()
        policy = bare_policy(acc, c.model)
        # Under FSDP/ZeRO-3 each rank holds a shard: gather one full state dict (all ranks take part).
        sharded = sharding_kind(c.model) != "none"
        full = acc.get_state_dict(c.model) if sharded else None
        critic_full = acc.get_state_dict(c.critic) if sharded and c.critic is not None else None
        if acc.is_main_process:
            policy.config.use_cache = True
            # the policy, or the policy + value_head.safetensors (PolicyWithValue.save_pretrained)
            acc.unwrap_model(c.model).save_pretrained(path, state_dict=full)
            c.tokenizer.save_pretrained(path)
            lora = self.cfg.model.lora
            if lora is not None and lora.save_merged:
                merged = copy.deepcopy(policy).merge_and_unload()  # a copy: the trainer's model keeps its adapter
                merged.save_pretrained(path / "merged", safe_serialization=True)
                c.tokenizer.save_pretrained(path / "merged")
                del merged
            policy.config.use_cache = False
            if c.critic is not None:
                acc.unwrap_model(c.critic).save_pretrained(path / "critic", state_dict=critic_full)
            (path / "config.yaml").write_text(dump_config(self.cfg))
            write_model_card(path, self.cfg, steps, history or {}, self.out)
        acc.wait_for_everyone()
        if self.cfg.train.push_to_hub and acc.is_main_process:
            self.print(f"pushed to {push(path, self.cfg.train.push_to_hub)}")


class StopSignals:
    """``with StopSignals(print) as stop:`` — SIGINT/SIGTERM append to ``stop.received``; the loop checks
    it after each step. A second signal stops at once (KeyboardInterrupt; the latest checkpoint stays)."""

    def __init__(self, say):
        self.say, self.received, self._old = say, [], {}
        self.step = 0

    def _handler(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received.append(signum)
        self.say(
            f"\nreceived {signal.Signals(signum).name}: finishing step {self.step + 1}, "
            "then writing a checkpoint (send again to stop at once)"
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)
