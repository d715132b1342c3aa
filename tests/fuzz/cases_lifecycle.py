"""The stage lifecycle in-process: resume after a cut chunk (r01, r02), output folders (f01, f02),
disk full (f03, f04), the stage's own manifest (t01), K-FAC's resume file (k06), and the no-op
re-run of all 8 stages (rr)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from fuzz.build import snapshot, truncate, write
from fuzz.process import KFAC
from fuzz.table import ANY, COMPLETE, CONFIG, RESUMABLE, Case, Ctx

LIFECYCLE = "lifecycle"
# stage 1 exactly as the tiny run scored (its scores.jsonl is the uninterrupted reference), in 7 chunks
SCORE_RUN = ("--limit", "112", "--metrics", "exact", "--chunk-size", "16")


def _argv(ctx: Ctx, *extra: str) -> list[str]:
    return ["--config", str(CONFIG), "--device", "cpu", "--output-dir", str(ctx.out), *SCORE_RUN, *extra]


def _interrupted(ctx: Ctx) -> Path:
    """Stage 1 stopped (as by Ctrl-C) just before it writes scores.jsonl: every chunk is on disk."""
    import memcirc.artifacts as art
    from memcirc.cli import main

    original = art.atomic_write_bytes

    def stop_before_scores(path, data):
        if Path(path).name == art.SCORES_JSONL and Path(path).parent.name == "memorization":
            raise KeyboardInterrupt
        return original(path, data)
    ctx.monkeypatch.setattr(art, "atomic_write_bytes", stop_before_scores)
    assert main("memorization_score", _argv(ctx)) == 130
    ctx.monkeypatch.setattr(art, "atomic_write_bytes", original)
    chunks = sorted((ctx.out / "memorization" / "chunks").glob("*.jsonl"))
    assert len(chunks) == 7, chunks
    return chunks[1]


def _cut_chunk(mid_line: bool):
    def build(ctx: Ctx) -> None:
        chunk = _interrupted(ctx)
        lines = chunk.read_bytes().splitlines(keepends=True)
        kept = b"".join(lines[:8]) + (lines[8][: len(lines[8]) // 2] if mid_line else b"")
        chunk.write_bytes(kept)
    return build


def same_scores_as_the_run(ctx: Ctx, _output: str) -> None:
    assert ctx.run is not None
    got = (ctx.out / "memorization" / "scores.jsonl").read_bytes()
    want = (ctx.run / "memorization" / "scores.jsonl").read_bytes()
    rows = [b.count(b"\n") for b in (got, want)]
    assert got == want, f"{rows[0]} rows of {rows[1]}, not byte-identical to an uninterrupted run"


def _disk_full(ctx: Ctx) -> None:
    """fsync of the second chunk fails with ENOSPC (what a full disk reports, at the latest, there)."""
    chunks = ctx.out / "memorization" / "chunks"
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.parent == chunks and ".jsonl." in path.name and any(chunks.glob("*.jsonl")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    ctx.monkeypatch.setattr(os, "fsync", fsync)
    ctx.extra["real_fsync"] = real_fsync


def _disk_full_then_room(ctx: Ctx) -> None:
    from memcirc.cli import main

    _disk_full(ctx)
    assert main("memorization_score", _argv(ctx)) == 1
    ctx.monkeypatch.setattr(os, "fsync", ctx.extra["real_fsync"])


def _own_manifest(blob: bytes | None):
    """The run's memorization folder copied to the case's own output dir, its manifest replaced."""
    def build(ctx: Ctx) -> None:
        stage = ctx.copy_stage("memorization", dest=ctx.out / "memorization")
        if blob is None:
            truncate(stage / "manifest.json")
        else:
            write(stage / "manifest.json", blob)
    return build


def _read_only(ctx: Ctx) -> None:
    if os.geteuid() == 0:     # root writes through permission bits; sysfs refuses mkdir to anyone
        ctx.extra["ro"] = "/sys/memcirc-fuzz-read-only"
    else:
        ro = ctx.tmp / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        ctx.extra["ro"] = str(ro)


def _shards_one_marker_cut(ctx: Ctx) -> None:
    """Both shards of a 2-shard run finished, then shard 0's done.json cut in half."""
    from memcirc.cli import main

    for i in ("0", "1"):
        assert main("memorization_score", ["--config", str(CONFIG), "--device", "cpu", "--output-dir", str(ctx.out),
                                           *SHARDED, "--shard-index", i]) == 0
    truncate(ctx.out / "memorization" / "shards" / "00000" / "done.json")


def _symlink_loop(ctx: Ctx) -> None:
    os.symlink("loop", ctx.tmp / "loop")


SHARDED = ("--limit", "8", "--metrics", "exact", "--chunk-size", "4", "--num-shards", "2")


# -- K-FAC's resume file ----------------------------------------------------------------------------

def _kfac_argv(ctx: Ctx, out: Path) -> list[str]:
    assert ctx.run is not None
    return ["--config", str(CONFIG), "--device", "cpu", "--output-dir", str(out), "--input-dir",
            str(ctx.run / "memorization"), *KFAC]


def _kfac_cut_partial(ctx: Ctx) -> None:
    """A K-FAC factor collection stopped after its first saves, its partial sums then cut in half."""
    import memcirc.artifacts as art
    from memcirc.cli import main

    original, saves = art.atomic_write_bytes, []

    def stop_after_two_saves(path, data):
        original(path, data)
        if Path(path).name.startswith("partial"):
            saves.append(path)
            if len(saves) == 2:
                raise KeyboardInterrupt
    ctx.monkeypatch.setattr(art, "atomic_write_bytes", stop_after_two_saves)
    assert main("kfac_edit", _kfac_argv(ctx, ctx.out)) == 130
    ctx.monkeypatch.setattr(art, "atomic_write_bytes", original)
    truncate(Path(saves[-1]), 0.5)


def _same_factors(ctx: Ctx, _output: str) -> None:
    name = "factors.safetensors"
    assert (ctx.out / "kfac" / name).read_bytes() == (Path(ctx.extra["kfac_ref"]) / "kfac" / name).read_bytes()


# -- rr: every stage re-run on the finished run -------------------------------------------------------

def _rerun_all(ctx: Ctx) -> None:
    from fuzz.runner import tiny_run_steps
    from memcirc.cli import main

    assert ctx.run is not None
    before = snapshot(ctx.run)
    for stage, argv in tiny_run_steps(ctx.run):
        assert main(stage, argv) == 0, stage
    after = snapshot(ctx.run)
    changed = sorted(str(p) for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"a re-run changed {changed}"


CASES = [
    Case("r01", "B: exit 0 with 56 of 64 rows (a chunk cut at a line boundary)", "memorization_score", SCORE_RUN,
         rc=0, state=COMPLETE, build=_cut_chunk(mid_line=False), check=same_scores_as_the_run, needs=("run",),
         owner=LIFECYCLE, reason="a cut chunk is recomputed: the re-run equals an uninterrupted run byte for byte"),
    Case("r02", "B: JSONDecodeError traceback forever (a chunk cut mid-line)", "memorization_score", SCORE_RUN, rc=0,
         state=COMPLETE, build=_cut_chunk(mid_line=True), check=same_scores_as_the_run, needs=("run",),
         owner=LIFECYCLE),
    Case("f01", "H", "memorization_score", ("--output-dir", "{ro}/run"), words=("not writable",), build=_read_only,
         owner=LIFECYCLE, reason="as root (CI containers) a read-only folder is /sys, where nobody may mkdir"),
    Case("f02", "H", "memorization_score", ("--output-dir", "{tmp}/blocker/sub"), words=("not writable",),
         build=lambda ctx: write(ctx.tmp / "blocker", ""), owner=LIFECYCLE),
    Case("x-output-file", "new: --output-dir an existing regular file", "memorization_score",
         ("--output-dir", "{tmp}/afile"), words=("afile",), build=lambda ctx: write(ctx.tmp / "afile", "x"),
         owner=LIFECYCLE),
    Case("x-output-symlink-loop", "new: --output-dir a symlink loop", "memorization_score",
         ("--output-dir", "{tmp}/loop"), words=("loop", "not writable"), build=_symlink_loop, owner=LIFECYCLE),
    Case("x-merge-no-shards", "new: --merge before any shard ran", "memorization_score", ("--merge",),
         words=("shards",), owner=LIFECYCLE),
    Case("x-merge-cut-marker", "new: --merge with one shard's done.json cut in half", "memorization_score",
         (*SHARDED, "--merge"), words=("shard",), state=RESUMABLE, build=_shards_one_marker_cut, owner=LIFECYCLE,
         reason="a cut done marker means the task is not done: the merge names it (re-run that shard), merges nothing"),
    Case("f03", "H (exit 1 = unexpected, with a 20-line traceback; one line would be kinder)", "memorization_score",
         SCORE_RUN, rc=1, words=("no space left", "re-run"), state=RESUMABLE, build=_disk_full, late=True,
         owner="config-cli",
         reason="exit 1 by design (memcirc/cli.py): the input was fine and the same command resumes once there is "
                "room, so it is not exit 2 ('change the input'); one error line, last on stderr, no traceback. "
                "ENOSPC is raised by fsync of the second chunk (no tmpfs mount needed)"),
    Case("f04", "H (600 rows == the first 600 rows of the baseline)", "memorization_score", SCORE_RUN, rc=0,
         state=COMPLETE, build=_disk_full_then_room, check=same_scores_as_the_run, needs=("run",), owner=LIFECYCLE),
    Case("t01", "B: StageRun.existing uses a bare json.loads (traceback)", "memorization_score", SCORE_RUN, rc=0,
         state=COMPLETE, build=_own_manifest(None), check=same_scores_as_the_run, needs=("run",), owner=LIFECYCLE,
         reason="an unreadable own manifest counts as an incomplete run, which is recomputed (exit 0), not refused"),
    Case("t01f", "B (t01 with --force)", "memorization_score", (*SCORE_RUN, "--force"), rc=0, state=COMPLETE,
         build=_own_manifest(None), check=same_scores_as_the_run, needs=("run",), owner=LIFECYCLE),
    Case("x-own-manifest-list", "new: own manifest.json holds a JSON list", "memorization_score", SCORE_RUN, rc=0,
         state=COMPLETE, build=_own_manifest(b"[1, 2]"), check=same_scores_as_the_run, needs=("run",), owner=LIFECYCLE),
    Case("x-own-manifest-binary", "new: own manifest.json of non-UTF-8 bytes", "memorization_score", SCORE_RUN, rc=0,
         state=COMPLETE, build=_own_manifest(bytes(range(128, 256))), check=same_scores_as_the_run, needs=("run",),
         owner=LIFECYCLE),
    Case("k06", "H with caveat: names the file, not the fix; fails forever; 2 INFO lines before the error",
         "kfac_edit", ("--input-dir", "{run}/memorization", *KFAC), rc=0, state=COMPLETE, build=_kfac_cut_partial,
         check=_same_factors, needs=("run", "kfac_ref"), owner=LIFECYCLE, fast=False,
         reason="a cut resume file is recomputed like a cut chunk: the factors equal an uninterrupted run's"),
    Case("rr", "H: all 76 files byte-identical", "*", needs=("run",), state=ANY, run=_rerun_all, owner=LIFECYCLE,
         reason="in-process on the tiny 8-stage run (the fixture's own commands), every file compared"),
]
