"""Shared test setup: an isolated cache, offline hubs, the tiny model and the ``slow`` marker.

The environment is set at import time, before any test module imports ``datasets`` or
``huggingface_hub`` (which read these variables when imported):

* ``RLHF_PG_CACHE`` → a fresh temporary directory, so tests never touch the user's cache;
* ``HF_DATASETS_CACHE`` → inside it, so loading local data files leaves nothing behind;
* ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` → 1, so hub look-ups fail at once instead of
  retrying for ~20 s on a machine without network.

Tests marked ``slow`` run only with ``--runslow`` or ``RLHF_PG_SLOW=1``.

GPUs: tests marked ``gpu`` run only where CUDA is visible and are skipped, with the reason, elsewhere
(``RLHF_PG_REQUIRE_GPU=1``, set by scripts/gpu_check.sh, turns that skip into a failure). Everything
else must pass on a CPU machine and on a GPU machine alike: a test whose subject is the CPU path
(bit-identical runs, 1-vs-2-process gloo runs) is marked ``cpu_only`` and runs in-process with CUDA
hidden, and every subprocess a test starts gets its environment from :func:`cpu_subprocess_env`.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest

_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="rlhf_pg-test-cache-"))
atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
os.environ["RLHF_PG_CACHE"] = str(_SESSION_CACHE)
os.environ["HF_DATASETS_CACHE"] = str(_SESSION_CACHE / "hf_datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import torch  # noqa: E402  (after the environment above)
from transformers import PreTrainedModel, PreTrainedTokenizerBase  # noqa: E402

from rlhf_pg.models import TINY_ALIAS, load_model, load_tokenizer, resolve_model  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # under pytest-xdist (pyproject.toml's addopts: ``-n 2``) the workers share the cores:
    # one torch thread each instead of every worker spinning up a thread per core
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--runslow``."""
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``slow``, ``gpu`` and ``cpu_only`` markers."""
    config.addinivalue_line("markers", "slow: needs the real SmolLM2 model or minutes of CPU; run with --runslow")
    config.addinivalue_line(
        "markers", "gpu: needs a CUDA GPU; skipped without one (a failure with RLHF_PG_REQUIRE_GPU=1)"
    )
    config.addinivalue_line(
        "markers",
        "cpu_only(reason): tests the CPU path; on a GPU machine it runs in-process with CUDA hidden "
        "(as CUDA_VISIBLE_DEVICES= would), never skipped",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``slow`` tests unless ``--runslow`` or ``RLHF_PG_SLOW=1``."""
    if config.getoption("--runslow") or os.environ.get("RLHF_PG_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or RLHF_PG_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """Directory of the tiny random Llama, built once in the session cache."""
    return Path(resolve_model(TINY_ALIAS))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer (as shipped with the tiny model), left-padded."""
    return load_tokenizer(TINY_ALIAS)


@pytest.fixture
def tiny_model(tiny_model_dir: Path) -> PreTrainedModel:
    """A fresh float32 tiny model on CPU for each test."""
    return load_model(TINY_ALIAS, dtype="float32", device=torch.device("cpu"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tests, restored afterwards. Tiny tensors: one thread is faster
    and does not fight other processes for the cores; and comparisons that must be bit-identical
    between this process and subprocesses (run with OMP_NUM_THREADS=1) need the same thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VOWELS_REWARD = '''
def vowels(completions, **kwargs):
    """A reward that varies across random completions: vowel count / 10 (TRL style: a conversational
    completion is a list of messages)."""
    texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [sum(ch in "aeiou" for ch in t) / 10 for t in texts]
'''
"""The tiny runs' reward (a file, loaded as users load theirs: `path/to/file.py:function`)."""


def tiny_tree(path: Path, **sections) -> dict:
    """The shared tiny run as a recipe tree: 2 GRPO steps of the tiny model on 2 prompts × 4 samples of
    ≤ 6 tokens, rewarded by vowel count. Each keyword replaces keys of one section (``algo={...}``)
    or sets a top-level value (``seed=5``). The reward file is written into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "rw.py").write_text(VOWELS_REWARD)
    tree = {
        "output_dir": str(path / "run"),
        "seed": 3,
        # float32 on any device: `auto` would be bfloat16 on a GPU, and the tolerances below are fp32 ones
        "model": {"name": TINY_ALIAS, "dtype": "float32"},
        "data": {"train": "arithmetic", "eval_limit": 4, "task_kwargs": {"n_train": 64, "n_eval": 8}},
        "batch": {"prompts_per_step": 2, "group_size": 4, "micro_batch_size": 4, "eval_batch_size": 4},
        "rollout": {"max_new_tokens": 6},
        "rewards": {"functions": [{"name": f"{path / 'rw.py'}:vowels"}]},
        "algo": {"name": "grpo"},
        "train": {"max_steps": 2, "lr": 1e-3, "samples_every": 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return tree


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(path, **sections)`` → the validated RunConfig of :func:`tiny_tree`."""
    from rlhf_pg.config import build_config

    return lambda path, **sections: build_config(tiny_tree(Path(path), **sections))


@pytest.fixture(scope="session")
def tiny_recipe():
    """``tiny_recipe(path, **sections)`` → a YAML recipe file of :func:`tiny_tree` (for subprocess runs)."""
    import yaml

    def write(path, **sections) -> Path:
        tree = tiny_tree(Path(path), **sections)
        tree.pop("output_dir")
        recipe = Path(path) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(tree, sort_keys=False))
        return recipe

    return write


# ------------------------------------------------------------------------------------ CPU and GPU
def cpu_subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a process a test starts: this one's with CUDA hidden (``CUDA_VISIBLE_DEVICES``
    empty), plus ``extra``. Every test that launches processes uses it, so the CPU suite's 2-process gloo
    runs, CLI runs and benchmark children test the CPU path on a GPU machine too (and ``--num-processes 2``
    starts CPU processes there instead of refusing a machine with one GPU)."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.update(extra)
    return env


def launch_with_config(config: str, worker, recipe, out, extra_env: dict | None = None, *overrides: str):
    """``accelerate launch --config_file recipes/accelerate/<config> --num_processes 2`` of ``worker recipe
    output_dir=out overrides…`` on CPU processes (CUDA hidden, one thread each, a free port); the finished
    process. For the engine tests (FSDP2, DeepSpeed) that run the shipped configs as a user would."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(root / "recipes/accelerate" / config),
    ]
    cmd += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port)]
    cmd += [str(worker), str(recipe), f"output_dir={out}", *overrides]
    env = cpu_subprocess_env(OMP_NUM_THREADS="1", TQDM_DISABLE="1", **(extra_env or {}))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def no_gpu_reason() -> str:
    """Why a ``gpu`` test does not run here."""
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"gpu: no CUDA device visible (torch {torch.__version__}, {build}); "
        "run scripts/gpu_check.sh on a machine with a GPU"
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``gpu`` tests: skipped without CUDA, with the reason; with ``RLHF_PG_REQUIRE_GPU=1`` (scripts/gpu_check.sh)
    a missing GPU fails them instead, so a GPU check never passes by skipping."""
    if item.get_closest_marker("gpu") is None or torch.cuda.is_available():
        return
    if os.environ.get("RLHF_PG_REQUIRE_GPU") == "1":
        pytest.fail(no_gpu_reason() + " (RLHF_PG_REQUIRE_GPU=1: a missing GPU is a failure)", pytrace=False)
    pytest.skip(no_gpu_reason())


@contextlib.contextmanager
def cuda_hidden():
    """This process as if started with ``CUDA_VISIBLE_DEVICES=``: ``torch.cuda.is_available()`` is False, so
    the trainer's Accelerator, evaluation and the loaders pick the CPU; processes started inside inherit
    the empty ``CUDA_VISIBLE_DEVICES``. Accelerate's per-process state (its device is fixed when it is first
    built) starts afresh on entry and on exit. Nothing changes on a machine without CUDA."""
    if not torch.cuda.is_available():
        yield
        return
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    patch = pytest.MonkeyPatch()
    patch.setattr(torch.cuda, "is_available", lambda: False)
    patch.setenv("CUDA_VISIBLE_DEVICES", "")
    try:
        yield
    finally:
        patch.undo()
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True, scope="module")
def _cpu_only_module(request):
    """A module marked ``cpu_only`` (``pytestmark``): CUDA hidden for all of it, module fixtures included."""
    with cuda_hidden() if request.node.get_closest_marker("cpu_only") else contextlib.nullcontext():
        yield


@pytest.fixture(autouse=True)
def _cpu_only_test(request):
    """A test marked ``cpu_only``: CUDA hidden for it."""
    with cuda_hidden() if request.node.get_closest_marker("cpu_only") else contextlib.nullcontext():
        yield


@pytest.fixture(autouse=True, scope="module")
def _module_tmp_cleanup(request, tmp_path_factory):
    """Remove the directories a module's fixtures made with ``tmp_path_factory`` (reference runs,
    checkpoints: ~0.1–0.5 GB each) once the module is done, unless one of its tests failed. With
    ``tmp_path_retention_policy = "failed"`` (pyproject.toml) a passed test's own ``tmp_path`` goes
    right after it, so a whole run peaks at a few hundred MB of disk instead of ~8 GB kept."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        for path in set(base.iterdir()) - before:
            shutil.rmtree(path, ignore_errors=True)
