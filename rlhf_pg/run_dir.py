"""The run directory: output-dir policy, resume, checkpoint orchestration, logs, final save, signals.

``output_dir/`` holds ``config.yaml``, ``metrics.jsonl``, ``samples.jsonl``, ``checkpoints/step_*``
(see :mod:`rlhf_pg.checkpoint` for their layout and atomicity) and, at the end, ``model/``.

* A run holds a lock on its ``output_dir`` (``.rlhf-pg.lock``, an ``flock`` the kernel drops when the
  process dies, so a killed run leaves nothing stuck); a second run into a directory in use stops with
  one line. :func:`check_output_dir` makes the checks that need no model (the CLI runs it first).
* A fresh run refuses an ``output_dir`` that already holds a run (unless ``overwrite``); a resumed
  run loads the newest checkpoint that verifies (:func:`rlhf_pg.checkpoint.problem`: its manifest's
  sizes and hashes) and cuts ``metrics.jsonl``/``samples.jsonl`` back to the lines they held when it
  was written, so every step is logged exactly once. A newer checkpoint that fails is named in one
  warning line and renamed ``corrupt-step_…``; when none is usable the run stops with one line and
  changes nothing. The main process verifies and decides, and tells the others which checkpoint to
  load (a broadcast), so every process loads the same one and hashes are computed once.
* A write the operating system refuses (a full disk, a read-only filesystem, a quota, permissions)
  — of a checkpoint, a JSONL line, the final model — stops the run with one line naming the file and
  the error, and how to resume; a failed checkpoint leaves the previous one intact. Where processes
  used to meet at a barrier they now agree (:meth:`RunDir._together`: each says whether its part
  failed), so when one process fails every process stops, and none waits for one that has gone.
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
from .distributed import engine_checkpoint, sharding_kind
from .errors import UserError, one_line, os_error_fix, os_error_of, os_error_text
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
        """Append rows to ``output_dir/name`` (main process; the rows are already gathered). Every
        process calls it: a refused write stops them all with one line."""
        path = self.out / name

        def append() -> None:
            if not (self.acc.is_main_process and rows):
                return
            self.out.mkdir(parents=True, exist_ok=True)
            with checkpoint.writing(path), open(path, "a") as f:
                for row in rows:
                    line = json.dumps(row) + "\n"
                    if name == "metrics.jsonl" and os.environ.get("RLHF_PG_FAULT"):
                        f.write(line[: len(line) // 2])  # a torn line, as a crash mid-write leaves it
                        f.flush()
                        fault("metrics-mid-line", row.get("step"), path)
                        line = line[len(line) // 2 :]
                    f.write(line)

        self._together(append, lambda f: f"could not write {path}: {f['reason']}; {self._how_to_resume(f)}")

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
        """Fresh run: refuse to clobber a previous one. Resume: load the newest checkpoint that
        verifies (restoring ``generator``) and return the trainer state it holds; None for a fresh
        start (also when resuming a run that wrote no checkpoint)."""
        cfg, main = self.cfg, self.acc.is_main_process
        decision: dict[str, str | None] = {"ckpt": None, "error": None}
        if main:  # the main process takes the lock, verifies and chooses; the others wait for its word
            try:
                self.lock = self._take_lock()  # before anything in the directory is read or removed
                if cfg.train.resume:
                    decision["ckpt"] = self._resume_from()
            except UserError as e:
                decision["error"] = str(e)
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            decision = broadcast_object_list([decision], from_process=0)[0]
        if decision["error"] is not None:
            raise UserError(decision["error"])  # on every process, so none is left waiting for the others
        ckpt = Path(decision["ckpt"]) if decision["ckpt"] is not None else None
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
        elif (self.out / "metrics.jsonl").exists() and not (cfg.overwrite or cfg.train.resume):
            raise _already_a_run(self.out)  # checked on every process, so none is left waiting for the others

        def write() -> None:
            if not main:
                return
            if state is not None:
                for name, key in (("metrics.jsonl", "metrics_lines"), ("samples.jsonl", "samples_lines")):
                    with checkpoint.writing(self.out / name):
                        checkpoint.truncate_lines(self.out / name, state[key])
            else:
                self.out.mkdir(parents=True, exist_ok=True)
                for name in ("metrics.jsonl", "samples.jsonl"):
                    (self.out / name).unlink(missing_ok=True)
                root = checkpoint.checkpoint_root(self.out)
                for old in sorted(root.iterdir()) if root.is_dir() else []:
                    if old.name.startswith(checkpoint.CORRUPT_PREFIX) and not cfg.overwrite:
                        continue  # set aside by an earlier resume: the user's to inspect or delete
                    if old.is_dir():
                        shutil.rmtree(old, ignore_errors=True)
                    else:
                        old.unlink(missing_ok=True)
            with checkpoint.writing(self.out / "config.yaml"):
                (self.out / "config.yaml").write_text(dump_config(cfg))

        self._together(
            write,
            lambda f: (
                f"could not write to output_dir '{self.out}': {f['reason']}{_in(f)} — "
                f"{os_error_fix(f['errno'])}, or choose another output_dir"
            ),
        )
        if ckpt is not None:
            self.print(f"resumed from {ckpt} (step {state['step']})")
        return state

    def _take_lock(self) -> DirLock:
        try:
            return DirLock(self.out)
        except OSError as e:
            raise UserError(
                f"cannot use output_dir '{self.out}': {os_error_text(e)}{_in({'file': e.filename})} — "
                f"{os_error_fix(e.errno)}, or choose another output_dir"
            ) from e

    def _resume_from(self) -> str | None:
        """Main process: the checkpoint to resume from (None: there is none, start afresh). Newer ones
        that fail verification get one warning line each and are renamed ``corrupt-step_…``; when none is
        usable, a UserError and nothing is changed."""
        chosen, rejected = checkpoint.usable_checkpoint(self.out)
        root = checkpoint.checkpoint_root(self.out)
        if chosen is None and rejected:
            listing = "; ".join(f"{p.name} ({why})" for p, why in rejected)
            raise UserError(
                f"cannot resume: no checkpoint in {root} is usable — {listing}. Nothing was changed: put a good "
                "checkpoint back, or start over with overwrite=true instead of --resume (this deletes them)"
            )
        for ckpt, why in rejected:
            try:
                moved = checkpoint.set_aside(ckpt)
            except OSError as e:
                raise UserError(
                    f"checkpoint {ckpt} is unusable ({why}) and could not be renamed: {os_error_text(e)} — "
                    f"{os_error_fix(e.errno)}, or move it out of {root} yourself, then resume again"
                ) from e
            self.print(
                f"warning: checkpoint {ckpt} is unusable ({why}); moved to {moved.name}; resuming from {chosen.name}"
            )
        return str(chosen) if chosen is not None else None

    # -------------------------------------------------------------------------------- agreement
    def _together(self, part, message, cleanup=None) -> None:
        """Run ``part()`` on this process, then agree with the others: a collective that every process
        calls at the same point, in place of a barrier. If ``part`` failed on any process, every
        process stops (after ``cleanup()`` on the main process): a refused write (an OSError, or a
        library's error that carries one) is a UserError with ``message(failure)`` on every process —
        ``failure`` has ``reason`` (``[Errno 28] No space left on device``), ``errno``, ``file`` and
        ``rank`` —; any other exception (a bug) is re-raised where it happened and is a RuntimeError
        naming it on the others. So no process waits at a barrier for one that has failed. (A
        BaseException — an injected fault, a second Ctrl-C — is not caught: it stops this process at
        once, as a kill would.)"""
        own, failure = None, None
        try:
            part()
        except Exception as e:
            own, err = e, os_error_of(e)
            failure = {"rank": self.rank, "os": err is not None, "errno": None, "file": None}
            failure["reason"] = f"{type(e).__name__}: {one_line(e)}"
            if err is not None:
                file = os.fsdecode(err.filename) if err.filename is not None else None
                failure.update(errno=err.errno, file=file, reason=os_error_text(err))
        failure = self._agree(failure)
        if failure is None:
            return
        if cleanup is not None and self.acc.is_main_process:
            cleanup()
        if own is not None and os_error_of(own) is None:
            raise own
        if not failure["os"]:
            raise RuntimeError(f"process {failure['rank']} failed: {failure['reason']}")
        raise UserError(message(failure)) from own

    def _agree(self, failure: dict | None) -> dict | None:
        """Collective: the failure of the lowest-ranked process that had one, or None (one all-reduce
        of a flag when nothing failed; the failures are gathered only when something did)."""
        if self.acc.num_processes == 1:
            return failure
        flag = torch.tensor(float(failure is not None), device=self.acc.device)
        if self.acc.reduce(flag, reduction="sum").item() == 0:
            return None
        from accelerate.utils import gather_object

        return next(f for f in gather_object([failure]) if f is not None)

    def _how_to_resume(self, failure: dict) -> str:
        fix = os_error_fix(failure["errno"])
        last = checkpoint.latest_checkpoint(self.out)
        if last is None:
            return f"no checkpoint was completed yet — {fix} and start again with --resume (it starts from step 0)"
        return f"the last complete checkpoint is {last.name} — {fix} and resume with --resume"

    # --------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, step: int, trainer_state: dict[str, Any], generator: torch.Generator) -> Path:
        """Atomically write everything needed to resume exactly after ``step`` (see checkpoint.py)."""
        acc, c, main = self.acc, self.c, self.acc.is_main_process
        root = checkpoint.checkpoint_root(self.out)
        tmp = checkpoint.tmp_dir_for(self.out, step)
        sharded = engine_checkpoint(self.acc, c.model)  # FSDP, ZeRO-3, or a DeepSpeed-sharded optimizer

        def make_tmp() -> None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
                with checkpoint.writing(tmp):
                    tmp.mkdir(parents=True)

        def write() -> None:
            checkpoint.save_process_rng(tmp, self.rank, generator)
            if sharded:  # every rank writes its shards of model, optimizer and scheduler
                acc.save_state(str(tmp / "engine"))
            if main:
                state = {
                    **trainer_state,
                    "step": step,
                    "metrics_lines": checkpoint.count_lines(self.out / "metrics.jsonl"),
                    "samples_lines": checkpoint.count_lines(self.out / "samples.jsonl"),
                }
                if sharded:
                    checkpoint.write_trainer_state(tmp, state)
                else:
                    checkpoint.write_main(
                        tmp,
                        self._checkpointed_module(),
                        c.optimizer,
                        c.scheduler,
                        state,
                        trainable_only=self.cfg.model.lora is not None,
                    )

        def commit() -> None:  # every process's files are in tmp: the manifest, fsync, rename, prune
            if main:
                checkpoint.commit(self.out, step, self.cfg.train.keep_checkpoints)

        def message(f: dict) -> str:
            where = f"{root}: {f['reason']}{_in(f, root)}"
            return f"could not write checkpoint step {step} to {where}; {self._how_to_resume(f)}"

        for part in (make_tmp, write, commit):  # a failed write is never picked; remove it now, not at the next commit
            self._together(part, message, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))
        return root / f"step_{step:06d}"

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
        self._together(
            lambda: self._write_model(path, policy, full, critic_full, history, steps),
            lambda f: (
                f"could not save the model to {path}: {f['reason']}{_in(f, path)}; {self._how_to_resume(f)} "
                "(it saves the model again)"
            ),
        )
        if self.cfg.train.push_to_hub and acc.is_main_process:
            self.print(f"pushed to {push(path, self.cfg.train.push_to_hub)}")

    def _write_model(self, path: Path, policy, full, critic_full, history: dict | None, steps: int) -> None:
        """Main process: the files of :meth:`save_model`."""
        acc, c = self.acc, self.c
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
            with checkpoint.writing(path / "config.yaml"):
                (path / "config.yaml").write_text(dump_config(self.cfg))
            with checkpoint.writing(path / "README.md"):
                write_model_card(path, self.cfg, steps, history or {}, self.out)


def _in(failure: dict, base: Path | None = None) -> str:
    """`` (file)`` for a failure's file, relative to ``base`` when inside it; empty when it names none."""
    if not failure.get("file"):
        return ""
    name = Path(failure["file"])
    if base is not None and name.is_relative_to(base):
        name = name.relative_to(base)
    return f" ({name})"


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
