"""The real-process cases: two runs on one folder (cc1, cc2), signals during scoring and K-FAC
(k01-k05), and run_pipeline.sh's own checks (w01-w07).

A run is paused with SIGSTOP at the point under test (its first chunk, its first resume save), so
whatever is sent next lands there, however slow the machine is: no sleeps, no wall-time asserts."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fuzz.build import write
from fuzz.table import CONFIG, REPO, Case, Ctx

LIFECYCLE, CONFIG_CLI = "lifecycle", "config-cli"
# stage 1 in 8 chunks (caught between two of them), exactly as the in-process reference
SCORE = ("--config", str(CONFIG), "--device", "cpu", "--limit", "32", "--chunk-size", "4", "--batch-size", "4",
         "--metrics", "exact", "token_match")
KFAC = ("--layers", "3", "--factor-tokens", "2048", "--batch-size", "2", "--chunk-size", "1", "--rhos", "0.5",
        "--formulas", "original", "--ppl-blocks", "2", "--ppl-block-len", "32", "--no-save-model", "--limit", "8")
WAIT_S = 600          # a deadline for a file to appear, only so that a broken build cannot hang the suite


def env() -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def spawn(ctx: Ctx, name: str, script: str, argv: list[str]) -> subprocess.Popen:
    """A stage script as a real process, its output into tmp/<name>.out / .err (pipes could fill)."""
    with open(ctx.tmp / f"{name}.out", "w") as out, open(ctx.tmp / f"{name}.err", "w") as err:
        return subprocess.Popen([sys.executable, str(REPO / script), *argv], stdout=out, stderr=err, env=env())


def stderr_of(ctx: Ctx, name: str) -> str:
    return (ctx.tmp / f"{name}.err").read_text()


def pause_when(proc: subprocess.Popen, path_glob: tuple[Path, str], ctx: Ctx, name: str) -> None:
    """SIGSTOP `proc` as soon as a file matching `path_glob` (folder, pattern) exists."""
    folder, pattern = path_glob
    deadline = time.monotonic() + WAIT_S
    while not (folder.is_dir() and any(folder.glob(pattern))):
        assert proc.poll() is None, f"{name} ended (rc {proc.returncode}) first: {stderr_of(ctx, name)[-2000:]}"
        assert time.monotonic() < deadline, f"no {folder}/{pattern} after {WAIT_S} s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)


def finish(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGCONT)
    return proc.wait(timeout=WAIT_S)


def same_files(a: Path, b: Path, names: tuple[str, ...]) -> None:
    differ = [n for n in names if (a / n).read_bytes() != (b / n).read_bytes()]
    assert not differ, f"{differ} differ from an uninterrupted run's"


def one_error_line(err: str, *words: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(("error: ", "run_pipeline.sh: ")) and "Traceback" not in err, err
    missing = [w for w in words if w.lower() not in lines[0].lower()]
    assert not missing, f"missing {missing} in {lines[0]!r}"
    return lines[0]


# -- cc1, cc2: a second run on a folder being written ----------------------------------------------------

def contend(tmp: Path) -> dict[str, Any]:
    """Run A (stage 1), stopped mid-run while it holds the folder; meanwhile B1 (A's config, cc1) and B2
    (another config, cc2) start on the same folder; then A goes on. One A serves both cases."""
    ctx = Ctx(tmp)
    stage = ctx.out / "memorization"
    a = spawn(ctx, "a", "memorization_score.py", [*SCORE, "--output-dir", str(ctx.out)])
    seen: dict[str, Any] = {"pid": a.pid, "stage": stage}
    try:
        pause_when(a, (stage / "chunks", "*.jsonl"), ctx, "a")   # A holds the lock, mid-run
        for name, extra in (("cc1", ()), ("cc2", ("--metrics", "exact", "lcp"))):
            # each B returns while A is stopped holding the lock: it refused at once, it did not wait
            seen[name] = subprocess.run([sys.executable, str(REPO / "memorization_score.py"), *SCORE,
                                         "--output-dir", str(ctx.out), *extra], env=env(), capture_output=True,
                                        text=True, timeout=WAIT_S)
        seen["a_rc"] = finish(a)
    finally:
        with contextlib.suppress(ProcessLookupError):
            a.send_signal(signal.SIGCONT)
            a.kill()
    seen["a_err"] = stderr_of(ctx, "a")
    return seen


def _second_run(ctx: Ctx, name: str) -> None:
    seen = ctx.extra["contended"]
    b, stage = seen[name], seen["stage"]
    assert b.returncode == 2, b.stderr[-2000:]
    one_error_line(b.stderr, "another memcirc run", f"pid {seen['pid']}", f"host {socket.gethostname()}",
                   str(stage))
    assert seen["a_rc"] == 0, seen["a_err"][-2000:]
    leftovers = sorted(p.name for p in stage.iterdir() if p.name not in
                       {"scores.jsonl", "summary.json", "histogram.png", "log.txt", "manifest.json", ".lock"})
    assert not leftovers, f"left in the finished folder: {leftovers}"
    same_files(stage, Path(ctx.extra["score_ref"]) / "memorization", ("scores.jsonl", "summary.json", "histogram.png"))


# -- k01-k03: a signal during scoring, then the same command ------------------------------------------------

def _signal_scoring(sig: signal.Signals, rc: int, message: str | None):
    def run(ctx: Ctx) -> None:
        from memcirc.cli import main

        stage = ctx.out / "memorization"
        argv = [*SCORE, "--output-dir", str(ctx.out)]
        proc = spawn(ctx, "cut", "memorization_score.py", argv)
        pause_when(proc, (stage / "chunks", "00001.jsonl"), ctx, "cut")
        proc.send_signal(sig)
        assert finish(proc) == rc, stderr_of(ctx, "cut")[-2000:]
        if message:   # after the INFO lines, the one line saying how to resume
            assert stderr_of(ctx, "cut").splitlines()[-1].startswith(message), stderr_of(ctx, "cut")[-2000:]
        assert not (stage / "manifest.json").exists()
        assert main("memorization_score", argv) == 0
        same_files(stage, Path(ctx.extra["score_ref"]) / "memorization", ("scores.jsonl", "summary.json",
                                                                           "histogram.png"))
        assert not (stage / "chunks").exists() and not list(ctx.tmp.rglob(".*.tmp"))
    return run


# -- k04, k05: K-FAC stopped in the factor collection, killed in the sweep ------------------------------------

def _signal_kfac(sig: signal.Signals, rc: int, at: str):
    def run(ctx: Ctx) -> None:
        from memcirc.cli import main

        stage = ctx.out / "kfac"
        argv = ["--config", str(CONFIG), "--device", "cpu", "--output-dir", str(ctx.out), "--input-dir",
                f"{ctx.run}/memorization", *KFAC]
        proc = spawn(ctx, "cut", "kfac_edit.py", argv)
        folder, pattern = (stage / "chunks", "partial*") if at == "collection" else (stage, "factors.safetensors")
        pause_when(proc, (folder, pattern), ctx, "cut")
        proc.send_signal(sig)
        assert finish(proc) == rc, stderr_of(ctx, "cut")[-2000:]
        assert not (stage / "manifest.json").exists()
        assert main("kfac_edit", argv) == 0
        same_files(stage, Path(ctx.extra["kfac_ref"]) / "kfac", ("factors.safetensors", "deltas.safetensors",
                                                                  "rho_curve.png"))
    return run


# -- run_pipeline.sh ---------------------------------------------------------------------------------------------

def pipeline(ctx: Ctx, *args: str, path_prefix: Path | None = None) -> subprocess.CompletedProcess:
    e = env()
    if path_prefix is not None:
        e["PATH"] = f"{path_prefix}:{e['PATH']}"
    return subprocess.run([str(REPO / "run_pipeline.sh"), *args], env=e, capture_output=True, text=True,
                          timeout=WAIT_S)


def _pipeline_refuses(yaml_text: str | None, args: tuple[str, ...], words: tuple[str, ...], stub_sbatch=False):
    def run(ctx: Ctx) -> None:
        config = str(CONFIG)
        if yaml_text is not None:
            config = str(write(ctx.tmp / "c.yaml", yaml_text))
        stubs = None
        if stub_sbatch:   # a login node whose controller cannot be reached
            stubs = ctx.tmp / "bin"
            write(stubs / "sbatch", "#!/bin/sh\necho 'sbatch: error: Batch job submission failed: Unable to "
                                    "contact slurm controller (connect failure)' >&2\nexit 1\n").chmod(0o755)
        r = pipeline(ctx, "--config", config, "--output-dir", str(ctx.out), "--device", "cpu", *args,
                     path_prefix=stubs)
        assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
        one_error_line(r.stderr, *words)
        assert not ctx.out.exists(), sorted(str(p) for p in ctx.out.rglob("*"))
    return run


def _slurm_dry_run_quotes(ctx: Ctx) -> None:
    out = ctx.tmp / "w07 dir ü"
    r = pipeline(ctx, "--slurm", "--dry-run", "--config", str(CONFIG), "--output-dir", str(out), "--to-stage",
                 "contrastive_dataset")
    assert r.returncode == 0, r.stderr[-2000:]
    sbatch = [ln for ln in r.stdout.splitlines() if ln.startswith("#SBATCH")]
    assert sbatch, r.stdout[:2000]
    for line in sbatch:   # sbatch splits #SBATCH lines at unquoted whitespace, as shlex does here
        words = shlex.split(line)
        assert len(words) == 2, f"an #SBATCH line splits into {words}"
        if words[1].startswith(("--output=", "--error=", "--chdir=")):
            value = words[1].split("=", 1)[1]
            assert value.startswith((str(out), str(REPO))), line
    assert not out.exists()


CASES = [
    Case("cc1", "B: the loser exits 2 with 'missing chunks [0..4]' and leaves a chunk in the finished folder",
         "memorization_score", process=True, needs=("score_ref", "contended"),
         run=lambda ctx: _second_run(ctx, "cc1"), owner=LIFECYCLE),
    Case("cc2", "B (worst): A's scores.jsonl has 1024 of 1472 rows of B's config under A's manifest",
         "memorization_score", process=True, needs=("score_ref", "contended"),
         run=lambda ctx: _second_run(ctx, "cc2"), owner=LIFECYCLE,
         reason="one stopped run A serves cc1 and cc2: B1 (A's config) and B2 (another) both start while A holds "
                "the folder"),
    Case("k01", "H: resumed; scores, summary and png byte-identical", "memorization_score", process=True,
         needs=("score_ref",), run=_signal_scoring(signal.SIGTERM, 143, "stopped by SIGTERM"), owner=LIFECYCLE),
    Case("k02", "H: byte-identical", "memorization_score", process=True, needs=("score_ref",),
         run=_signal_scoring(signal.SIGKILL, -9, None), owner=LIFECYCLE),
    Case("k03", "H: byte-identical", "memorization_score", process=True, needs=("score_ref",),
         run=_signal_scoring(signal.SIGINT, 130, "interrupted"), owner=LIFECYCLE),
    Case("k04", "H: factors.safetensors byte-identical to the baseline", "kfac_edit", process=True,
         needs=("run", "kfac_ref"), run=_signal_kfac(signal.SIGTERM, 143, "collection"), owner=LIFECYCLE),
    Case("k05", "H: factors, deltas, png identical", "kfac_edit", process=True, needs=("run", "kfac_ref"),
         run=_signal_kfac(signal.SIGKILL, -9, "sweep"), owner=LIFECYCLE),
    Case("w01", "H", "run_pipeline.sh", process=True, owner=CONFIG_CLI,
         run=_pipeline_refuses("pipeline: [memorization_score, find_circuit]\n", (), ("find_circuit",))),
    Case("w02", "H", "run_pipeline.sh", process=True, owner=CONFIG_CLI,
         run=_pipeline_refuses(None, ("--from-stage", "find_circuit"), ("find_circuit",))),
    Case("w03", "H", "run_pipeline.sh", process=True, owner=CONFIG_CLI,
         run=_pipeline_refuses(None, ("--from-stage", "verify_circuit", "--to-stage", "contrastive_dataset"),
                               ("verify_circuit",))),
    Case("w04", "H", "run_pipeline.sh", process=True, owner=CONFIG_CLI,
         run=_pipeline_refuses(None, ("--modle", "x"), ("--modle",))),
    Case("w05", "H", "run_pipeline.sh", process=True, owner=CONFIG_CLI,
         run=_pipeline_refuses("- a\n- b\n", (), ("mapping",))),
    Case("w06", "H (sbatch's errors joined)", "run_pipeline.sh", process=True, owner=CONFIG_CLI,
         run=_pipeline_refuses(None, ("--slurm", "--to-stage", "contrastive_dataset"), ("sbatch",),
                               stub_sbatch=True)),
    Case("w07", "? #SBATCH --output=<dir with space>/... unquoted; not run through sbatch", "run_pipeline.sh",
         process=True, run=_slurm_dry_run_quotes, owner=CONFIG_CLI,
         reason="checked on the dry run's scripts: each #SBATCH line is two words once sbatch-style split"),
    Case("x-slurm-newline", "new: --slurm --dry-run with a newline in --output-dir", "run_pipeline.sh", process=True,
         owner=CONFIG_CLI, run=lambda ctx: _slurm_newline(ctx)),
]


def _slurm_newline(ctx: Ctx) -> None:
    out = ctx.tmp / "a\nb"
    r = pipeline(ctx, "--slurm", "--dry-run", "--config", str(CONFIG), "--output-dir", str(out))
    assert r.returncode == 2, (r.returncode, r.stdout[-1000:], r.stderr[-1000:])
    line = one_error_line(r.stderr.replace(str(out), "OUT"))
    assert any(w in line for w in ("newline", "control character", "'\\n'")), line
