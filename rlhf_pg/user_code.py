"""Loading the user's own Python: reward functions, and plugins that register registry entries.

A reference is a module name (``package.module``, imported with :func:`importlib.import_module`, so it
must be installed or on ``PYTHONPATH``) or a file path (``path/to/file.py``, relative to the current
directory or absolute). Every failure is a one-line :class:`~rlhf_pg.errors.UserError` naming what
the code was loaded for and how to fix it.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import itertools
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from .errors import UserError, one_line

_ids = itertools.count()
_plugins: dict[str, ModuleType] = {}


def is_file_ref(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def import_module(name: str, what: str) -> ModuleType:
    """Import ``name`` for ``what`` (e.g. "reward function 'm:f'")."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UserError(
            f"cannot import module {name!r} for {what}: {one_line(exc)} — install it, "
            "add its folder to PYTHONPATH, or give a file path (path/to/file.py)"
        ) from exc
    except Exception as exc:
        raise UserError(
            f"importing module {name!r} for {what} raised {type(exc).__name__}: {one_line(exc)} — fix the module"
        ) from exc


def load_file(where: str, what: str, fix_path: str) -> ModuleType:
    """Execute the file ``where`` as a fresh module (a unique name each call) for ``what``;
    ``fix_path`` says where the path came from (in the 'not found' message)."""
    path = Path(where).expanduser().resolve()
    if not path.is_file():
        raise UserError(
            f"{what}: file {where!r} not found (looked for {path}; relative paths start at the "
            f"current directory {Path.cwd()}) — {fix_path}"
        )
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"_rlhf_pg_user_{next(_ids)}_{stem}"  # unique: each load is a fresh module
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UserError(f"cannot load {where!r} as Python code for {what} — give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses, pickling and typing look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise UserError(
            f"loading {where!r} for {what} raised {type(exc).__name__}: {one_line(exc)} — fix the file"
        ) from exc
    return module


def import_plugins(refs: list[str]) -> None:
    """Import the recipe's ``imports`` (modules or files) once per process, before the config is
    validated: they register their own advantage estimators, losses, KL estimators or aggregations."""
    for ref in refs:
        key = str(Path(ref).expanduser().resolve()) if is_file_ref(ref) else ref
        if key in _plugins:
            continue
        what = f"imports entry {ref!r}"
        _plugins[key] = (
            load_file(ref, what, "fix the path in the recipe's `imports`")
            if is_file_ref(ref)
            else import_module(ref, what)
        )


def load_callable(ref: str, what: str, expected: str) -> Any:
    """Resolve ``package.module:name`` or ``path/to/file.py:name`` to a callable for ``what`` (e.g.
    "reward function 'f.py:score'"); ``expected`` describes what it should be, for the messages."""
    where, _, attr = ref.rpartition(":")
    if not where or not attr:
        raise UserError(f"{what} is malformed: write 'package.module:name' or 'path/to/file.py:name'")
    module = (
        load_file(where, what, f"fix the path before ':' in {ref!r}")
        if is_file_ref(where)
        else import_module(where, what)
    )
    if not hasattr(module, attr):
        found = sorted(
            name
            for name, value in vars(module).items()
            if callable(value) and not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
        )
        close = difflib.get_close_matches(attr, found, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(
            f"{attr!r} not found in {where!r} for {what}{hint}; callables defined there: "
            f"{', '.join(found) or 'none'} — fix the name after ':' in {ref!r}"
        )
    obj = getattr(module, attr)
    if not callable(obj):
        raise UserError(f"{what} is a {type(obj).__name__}, not callable — point it at {expected}")
    return obj


def call_in_thread(
    fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float, name: str
) -> tuple[bool | None, Any]:
    """Call a user's synchronous ``fn(**kwargs)`` with a time limit: (True, value), (False, exception),
    or (None, None) when it did not return within ``timeout_s``. Python cannot kill a thread: a call
    that overruns is *abandoned* (a daemon thread, left to finish or to die with the process) while the
    caller goes on. An awaitable result is awaited in the thread."""
    import asyncio
    import inspect

    box: list[tuple[bool, Any]] = []

    def work() -> None:
        try:
            value = fn(**kwargs)
            if inspect.isawaitable(value):  # a sync wrapper around a coroutine function
                value = asyncio.run(_awaited(value))
            box.append((True, value))
        except BaseException as exc:  # reported by the caller; the thread ends either way
            box.append((False, exc))

    thread = threading.Thread(target=work, name=f"rlhf_pg-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive() or not box:
        return None, None
    return box[0]


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def run_coroutines(coros: list) -> list:
    """Await the user's coroutines together (async reward functions, environments); exceptions are
    returned in place of results, not raised. Works inside a running event loop too (a notebook)."""
    import asyncio
    import concurrent.futures

    if not coros:
        return []

    async def gather() -> list:
        return await asyncio.gather(*coros, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a loop already runs in this thread
        return pool.submit(asyncio.run, gather()).result()
