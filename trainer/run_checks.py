"""Run-level checks made before any work starts, each failure one line naming the setting and
the fix (ValueError): the command line (config group options, ``trainer.engine=NAME``), the run
directory, and a resumed run's settings against its checkpoint's. Also the run's log file
(``train.log``: what the run printed) and its closing summary line.
"""

from __future__ import annotations

import difflib
import json
import os
import sys

# config groups (conf/<group>/*.yaml) chosen with ``group=option`` on the command line
GROUPS = ("experiment", "recipe", "model", "data", "parallel", "engine", "optim", "trainer", "logger")
# model.* settings that change how the model computes, not what it is: free to change on resume
_MODEL_RUNTIME = frozenset({"model.linear_impl", "model.linear_chunk_size", "model.init_std"})
# settings a resumed run changes without it being news
_QUIET = frozenset({"trainer.stop_after", "trainer.progress_bar", "trainer.run_dir"})


def group_options(conf: str, group: str) -> list[str]:
    """The options of config group ``group``: ``conf/<group>/**/*.yaml`` without the suffix."""
    root = os.path.join(conf, group)
    out = []
    for d, _, names in os.walk(root):
        rel = os.path.relpath(d, root)
        out += [os.path.normpath(os.path.join(rel, n[: -len(".yaml")])) for n in names if n.endswith(".yaml")]
    return sorted(out)


def _overrides(argv: list[str]):
    """(key without +/~ prefixes and @package, value) of each ``key=value`` Hydra override."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not key.startswith("-"):
            yield key.lstrip("+~").split("@")[0], value


def override_keys(argv: list[str]) -> set[str]:
    """The setting each ``key=value`` Hydra override names (``+``/``~`` and ``@package`` stripped)."""
    return {key for key, _ in _overrides(argv)}


def check_group_choices(argv: list[str], conf: str) -> None:
    """ValueError for ``group=option`` naming no file of the group (Hydra skips an unknown
    option of an ``optional`` default, e.g. ``experiment=quickstrat``, and trains the default
    config), or for ``trainer.engine=NAME`` (a node: the engine is the group ``engine=NAME``)."""
    for key, value in _overrides(argv):
        if key == "trainer.engine" and not value.lstrip().startswith("{"):
            raise ValueError(
                f"trainer.engine={value} sets a whole settings node: choose the engine with the group "
                f"engine={value} (or trainer.engine.name={value})"
            )
        if key not in GROUPS or value in ("null", ""):
            continue
        options = group_options(conf, key)
        for choice in value.split(","):  # a --multirun sweep lists several
            choice = choice.strip()
            if choice not in options:
                close = difflib.get_close_matches(choice, options, n=3, cutoff=0.6)
                hint = f"did you mean {' or '.join(close)}? " if close else ""
                raise ValueError(
                    f"{key}={choice} is unknown: {hint}{key} has {', '.join(options) or 'no options'} "
                    f"({os.path.join('conf', key)}/*.yaml)"
                )


def run_dir_arg(argv: list[str]) -> str | None:
    """The value of a ``trainer.run_dir=...`` override (the last one wins), or None."""
    found = None
    for key, value in _overrides(argv):
        if key == "trainer.run_dir":
            found = None if value in ("null", "") else value.strip("'\"")
    return found


def hydra_dir_overrides(argv: list[str]) -> list[str]:
    """``hydra.run.dir`` following ``trainer.run_dir`` (unless given), so that Hydra's ``.hydra``
    record and ``train.log`` go into the run dir instead of a fresh ``outputs/<exp>/<time>``."""
    run_dir = run_dir_arg(argv)
    if run_dir is None or any(key == "hydra.run.dir" for key, _ in _overrides(argv)):
        return []
    return [f"hydra.run.dir={run_dir}"]


def check_run_dir(run_dir: str) -> None:
    """ValueError when ``trainer.run_dir`` is a file, lies under a file, or is not writable."""
    path = os.path.abspath(run_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"trainer.run_dir={run_dir} is a file, not a directory: give a directory "
            "(a new one starts a run, an existing run dir resumes)"
        )
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"trainer.run_dir={run_dir} lies under {existing}, which is a file: give another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is" if existing == path else f"would be created in {existing}, which is"
        raise ValueError(
            f"trainer.run_dir={run_dir} {what} not writable: fix its permissions or choose a writable trainer.run_dir"
        )


def check_command_line(argv: list[str], conf: str) -> None:
    """Every check that needs only the command line, made before Hydra creates any directory."""
    check_group_choices(argv, conf)
    run_dir = run_dir_arg(argv)
    if run_dir is not None and "${" not in run_dir:
        check_run_dir(run_dir)


def _flat(node, prefix: str = "") -> dict:
    """{"a.b.c": leaf} of a nested dict (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix[:-1]: node}
    out = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(setting, checkpoint's value, current value) for each setting that differs, sorted."""
    a, b = _flat(saved), _flat(json.loads(json.dumps(current)))  # JSON: as the checkpoint stored it
    missing = object()
    return [
        (k, a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing) and k not in _QUIET
    ]


def check_resume_config(saved: dict | None, current: dict, step: int) -> list[str]:
    """Compare the settings a checkpoint was written with (its meta's ``config``) with the
    current ones. A model.* (architecture) change is a ValueError naming each; other changes
    come back as one notice line (the run goes on with the new values)."""
    if not saved:
        return []  # written before checkpoints kept their settings
    changes = config_changes(saved, current)
    arch = [c for c in changes if c[0].startswith("model.") and c[0] not in _MODEL_RUNTIME]
    if arch:
        listed = ", ".join(f"{k}={new} (checkpoint: {old})" for k, old, new in arch)
        raise ValueError(
            f"resuming step {step} with a different architecture: {listed}; restore those settings "
            "to resume, or choose a new trainer.run_dir (init_from=<this run dir> starts from its weights)"
        )
    if not changes:
        return []
    listed = ", ".join(f"{k}={new} (checkpoint: {old})" for k, old, new in changes)
    return [f"resuming step {step} with settings that differ from the checkpoint's: {listed}"]


class RunLog:
    """Copies everything written to stdout and stderr into ``path`` (appending: a resumed run
    adds to it), so ``train.log`` holds what the run printed."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 -- closed by close()
        self.streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self.file), _Tee(sys.stderr, self.file)

    def close(self) -> None:
        sys.stdout, sys.stderr = self.streams
        self.file.close()


class _Tee:
    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text: str) -> int:
        if "\r" not in text:  # progress-bar redraws stay on the terminal
            self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the terminal's
        return getattr(self.stream, name)


def summary_line(out: dict, seconds: float, run_dir: str, newest_checkpoint: str | None) -> str:
    """The run's closing line: steps, wall time, final loss, where its checkpoint and metrics are."""
    hist = out.get("history") or []
    parts = [f"[longctx] done: step {out['step']} ({len(hist)} steps in {seconds:.1f} s)"]
    if hist:
        parts.append(f"final loss {hist[-1]:.4f}")
    if "val_loss" in out:
        parts.append(f"val_loss {out['val_loss']:.4f}")
    ckpt = os.path.join(run_dir, "checkpoints", newest_checkpoint) if newest_checkpoint else "none"
    parts.append(f"checkpoint {ckpt}")
    parts.append(f"metrics {os.path.join(run_dir, 'metrics.jsonl')}")
    return ", ".join(parts)
