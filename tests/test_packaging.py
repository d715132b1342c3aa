"""The package as a user gets it: the wheel, built offline, installed into a fresh venv and run as
`memcirc` from a folder outside the checkout.

The fresh venv downloads nothing: a .pth file lets it see this environment's packages (all but
memcirc itself and auto-circuit), and `pip install --no-index WHEEL` resolves the wheel's declared
ranges against them, so a range that excluded a pinned version fails the install. Without
auto-circuit (not a declared dependency) scoring runs and the circuit stages stop with the command
that installs it. The slow test installs from the package index for real, into a venv that sees nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

from memcirc import __version__

SITE = Path(sysconfig.get_paths()["purelib"])   # this environment's packages
# what the fresh venv must not see: the checkout's own (editable) memcirc, and auto-circuit
HIDDEN = ("memcirc", "__editable__", "auto_circuit")
NOT_COPIED = (".venv", ".git", "runs", "out", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
              ".whl", ".gl")


def _env(**extra: str) -> dict[str, str]:
    """The environment without pip's configuration (index, find-links, constraints) or PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _run(cmd: list[str | Path], cwd: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


def build_wheel(root: Path) -> Path:
    """`pip wheel --no-deps --no-build-isolation` of a copy of the checkout (build/ stays out of it)."""
    src = root / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(*NOT_COPIED), symlinks=True)
    done = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                 "-w", root / "dist", src], cwd=root)
    assert done.returncode == 0, done.stderr
    (wheel,) = (root / "dist").glob("memcirc-*.whl")
    return wheel


def venv_seeing_this_one(root: Path) -> Path:
    """A venv without pip of its own whose site-packages see this environment's, less HIDDEN, through a
    .pth file (a folder of links: the packages are used in place, nothing is copied or downloaded)."""
    view = root / "view"
    view.mkdir(parents=True)
    for entry in SITE.iterdir():
        if not entry.name.startswith(HIDDEN) and entry.suffix != ".pth":
            (view / entry.name).symlink_to(entry)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    python = root / "venv" / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root)
    (Path(purelib.stdout.strip()) / "memcirc_test_deps.pth").write_text(f"{view}\n")
    return python


def check_installed(bin_dir: Path, work: Path) -> None:
    """`memcirc --version`, `memcirc score --help` and a testbed scoring of 8 windows, from `work`."""
    memcirc = bin_dir / "memcirc"
    where = _run([bin_dir / "python", "-c", "import memcirc; print(memcirc.__file__)"], cwd=work)
    assert where.stdout.startswith(str(bin_dir.parent)), where.stdout + where.stderr   # the wheel's, not the checkout's
    version = _run([memcirc, "--version"], cwd=work)
    assert (version.returncode, version.stdout) == (0, f"memcirc {__version__}\n")
    usage = _run([memcirc, "score", "--help"], cwd=work)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: memcirc score "), usage.stderr
    out = work / "run"
    scored = _run([memcirc, "score", "--config", REPO / "configs" / "testbed.yaml", "--output-dir", out,
                   "--limit", "8"], cwd=work, OMP_NUM_THREADS="1")
    assert scored.returncode == 0, scored.stderr
    rows = (out / "memorization" / "scores.jsonl").read_text().splitlines()
    assert len(rows) == 8 and all(json.loads(r)["id"] for r in rows)
    assert (out / "memorization" / "manifest.json").is_file()


def test_the_wheel_installs_offline_and_runs_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path / "build")
    python = venv_seeing_this_one(tmp_path / "env")
    done = _run([python, "-m", "pip", "install", "-q", "--no-index", wheel], cwd=tmp_path)
    assert done.returncode == 0, done.stderr   # every declared range admits the version installed here
    work = tmp_path / "elsewhere"
    work.mkdir()
    check_installed(python.parent, work)
    lexicon = _run([python, "-c", "from memcirc.tasks.generators import lexicon; print(len(lexicon()['names']))"],
                   cwd=work)
    assert lexicon.returncode == 0 and lexicon.stdout.strip() == "2", lexicon.stderr   # the tasks' data ships
    # auto-circuit is not a dependency: the stages that need it say how to install it (exit 2, one line)
    for command in ("circuits", "verify"):
        stopped = _run([python.parent / "memcirc", command, "--output-dir", work / "run"], cwd=work)
        assert stopped.returncode == 2, stopped.stderr
        assert stopped.stderr.count("\n") == 1 and "pip install --no-deps auto-circuit==1.0.1" in stopped.stderr


@pytest.mark.slow
def test_a_real_install_from_the_index(tmp_path):
    """`pip install WHEEL torch==2.13.0` into a bare venv, from the package index (network)."""
    wheel = build_wheel(tmp_path / "build")
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True)
    bin_dir = tmp_path / "venv" / "bin"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # pip's own configuration stays
    done = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel), "torch==2.13.0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    check_installed(bin_dir, work)
