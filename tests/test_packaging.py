"""The package installs without -e: pyproject lists every package and config group, a built
wheel carries the Hydra configs, and the installed entry point finds them."""

import glob
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject():
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_package_and_config_group_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    want = set()
    for top in ("models", "parallel", "trainer"):
        for init in glob.glob(os.path.join(ROOT, top, "**", "__init__.py"), recursive=True):
            want.add(os.path.relpath(os.path.dirname(init), ROOT).replace(os.sep, "."))
    want.add("trainer.conf")
    for group in glob.glob(os.path.join(ROOT, "conf", "*", "")):
        want.add("trainer.conf." + os.path.basename(os.path.dirname(group)))
    assert listed == want, (sorted(listed - want), sorted(want - listed))


@pytest.mark.slow
def test_wheel_carries_the_configs(tmp_path):
    # build from a copy of the sources: setuptools writes build/ and *.egg-info beside them
    src = tmp_path / "src"
    src.mkdir()
    for top in ("pyproject.toml", "README.md", "models", "parallel", "trainer", "conf"):
        if os.path.isdir(os.path.join(ROOT, top)):
            shutil.copytree(os.path.join(ROOT, top), src / top, ignore=shutil.ignore_patterns("__pycache__"))
        elif os.path.exists(os.path.join(ROOT, top)):
            shutil.copy(os.path.join(ROOT, top), src / top)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        cwd=tmp_path,
    )
    wheel = glob.glob(str(tmp_path / "longctx-*.whl"))[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    confs = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "conf", "**", "*.yaml"), recursive=True)}
    assert {"trainer/" + c.replace(os.sep, "/") for c in confs} <= names
    assert "trainer/train.py" in names and "parallel/strategies/ring.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    # unpacked wheel alone on the path: the installed entry point composes its own configs
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "from trainer.config import conf_dir; import os; d = conf_dir(); "
        "assert d.startswith(os.environ['SITE']), d; "
        "from hydra import compose, initialize_config_dir; from trainer.train import to_config; "
        "initialize_config_dir(config_dir=d, version_base='1.3'); "
        "print(to_config(compose(config_name='train', overrides=['experiment=quickstart'])).experiment)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(site), "SITE": str(site)},
    )
    assert out.returncode == 0 and out.stdout.strip() == "quickstart", out.stderr
