"""Run one case in-process through `memcirc.cli.main` and check what the table promises."""

from __future__ import annotations

import io
import json
import os
import sys
import traceback
from pathlib import Path

from fuzz.build import snapshot
from fuzz.table import ANY, COMPLETE, CONFIG, NOTHING, REPO, RESUMABLE, UNCHANGED, Case, Ctx

# The tiny finished run every downstream case reads: each stage as cheap as it goes (seconds).
TINY = {
    "memorization_score": ("--limit", "112", "--metrics", "exact", "--chunk-size", "16"),
    "contrastive_dataset": ("--limit", "8"),
    "find_circuits": ("--ig-steps", "0", "--curve-points", "4"),
    "verify_circuit": ("--ablations", "resample", "--random-circuits", "1", "--edge-counts", "4"),
    "attention_bypass": ("--limit", "8", "--layers", "0", "--ppl-blocks", "2", "--ppl-block-len", "32"),
    "kfac_edit": ("--limit", "8", "--layers", "3", "--factor-tokens", "256", "--rhos", "0.5", "--formulas",
                  "original", "--ppl-blocks", "2", "--ppl-block-len", "32", "--no-save-model"),
    "training_dynamics": ("--checkpoints", "{ckpt}/step-652", "{model}", "--steps", "652", "870", "--no-circuits",
                          "--limit", "16"),
    "predict_memorization": ("--folds", "2", "--permutation-repeats", "1", "--corpus-tokens", "5000",
                             "--dynamics-dir", "none", "--classifiers", "logistic_regression"),
}
UPSTREAM = {"contrastive_dataset": "memorization", "find_circuits": "contrastive", "verify_circuit": "circuits",
            "attention_bypass": "memorization", "kfac_edit": "memorization", "training_dynamics": "memorization",
            "predict_memorization": "memorization"}
# A case's FAST flags: the tiny run's, reading the tiny run's folders (stage 1: 8 windows only)
FAST = {stage: (("--input-dir", f"{{run}}/{UPSTREAM[stage]}") if stage in UPSTREAM else ()) + flags
        for stage, flags in TINY.items()}
FAST["memorization_score"] = ("--limit", "8", "--metrics", "exact")


def tiny_run_steps(run: Path) -> list[tuple[str, list[str]]]:
    """The tiny run's commands (stage, argv), in pipeline order; re-running them is a no-op (rr)."""
    from fuzz.table import CHECKPOINTS, TESTBED_MODEL

    fields = {"ckpt": str(CHECKPOINTS), "model": str(TESTBED_MODEL)}
    common = ["--config", str(CONFIG), "--device", "cpu", "--output-dir", str(run)]
    return [(stage, common + [a.format(**fields) for a in flags]) for stage, flags in TINY.items()]


def template(case: Case) -> list[str]:
    """The case's argv with its placeholders still in."""
    prefix = ["--config", "{config}", "--device", "cpu", "--output-dir", "{out}"] if case.prefix else []
    fast = list(FAST.get(case.stage, ())) if case.prefix and case.fast else []
    return prefix + fast + list(case.argv)


def needs(case: Case) -> set[str]:
    text = " ".join(template(case))
    return {n for n in ("run", "other") if f"{{{n}}}" in text} | set(case.needs)


def command(case: Case, ctx: Ctx) -> list[str]:
    fields = ctx.fields()
    return [a.format(**fields) for a in template(case)]


def run_in_process(case: Case, ctx: Ctx, capsys) -> tuple[int, str, str, list[str]]:
    """(exit code, stdout, stderr, argv) of `main(case.stage, argv)`; an escaped exception is exit 1
    with its traceback on stderr, as the real script would end."""
    from memcirc.cli import main

    if case.build is not None:
        case.build(ctx)
    argv = command(case, ctx)
    capsys.readouterr()   # what the builder printed is not the case's output
    if case.stdin is not None:
        ctx.monkeypatch.setattr(sys, "stdin", io.StringIO(case.stdin))
    tb = ""
    try:
        rc = main(case.stage, argv)
    except SystemExit as e:   # argparse's --help
        rc = e.code if isinstance(e.code, int) else 2
    except Exception:   # noqa: BLE001 - the script would die with this traceback: exit 1
        rc, tb = 1, traceback.format_exc()
    out, err = capsys.readouterr()
    return rc, out, err + tb, argv


def stage_dir(case: Case, argv: list[str]) -> Path | None:
    from memcirc.stages.registry import STAGES

    if case.stage not in STAGES or "--output-dir" not in argv:
        return None
    root = argv[len(argv) - 1 - argv[::-1].index("--output-dir") + 1]
    return Path(root) / STAGES[case.stage].folder


def found(word: str | tuple[str, ...], text: str) -> bool:
    options = (word,) if isinstance(word, str) else word
    return any(o.lower() in text.lower() for o in options)


def check(case: Case, ctx: Ctx, rc: int, out: str, err: str, argv: list[str]) -> None:
    """Every promise of the table for one finished command."""
    shown = f"[{case.id}] rc={rc}\nstderr (tail): {err[-2500:]}\nstdout (tail): {out[-500:]}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if os.environ.get("MEMCIRC_FUZZ_SHOW") and sys.__stderr__:   # what each case printed, for a reader
        sys.__stderr__.write(f"\n[{case.id}] rc={rc} {lines[-1][:300] if lines else ''}\n")
    assert rc == case.rc, f"exit code {rc}, expected {case.rc}\n{shown}"
    if case.rc != 0:
        assert "Traceback" not in err, shown
        if case.late:   # INFO lines of the work already done may come first; the error line is last
            assert lines and lines[-1].startswith("error: "), shown
            assert sum(ln.startswith("error:") for ln in lines) == 1, shown
        else:
            assert len(lines) == 1 and lines[0].startswith("error: "), f"not exactly one error line\n{shown}"
        text = lines[-1]
        if case.max_chars is not None:
            assert len(text) <= case.max_chars, f"the error line has {len(text):,} characters\n{shown[:3000]}"
    else:
        text = out + err
    missing = [w for w in case.words if not found(w, text)]
    assert not missing, f"missing words {missing}\n{shown}"
    check_state(case, ctx, stage_dir(case, argv))
    assert not ctx.marker.exists(), f"[{case.id}] a payload ran: {ctx.marker} exists"
    temp = [p for p in ctx.tmp.rglob(".*.tmp")]
    assert not temp, f"[{case.id}] temp files left: {temp}"
    if case.check is not None:
        case.check(ctx, out + err)


def check_state(case: Case, ctx: Ctx, folder: Path | None) -> None:
    if case.state == ANY or folder is None:
        return
    listing = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.is_dir() else []
    if case.state == NOTHING:
        assert not folder.exists(), f"[{case.id}] {folder} was left behind: {listing}"
    elif case.state == COMPLETE:
        manifest = folder / "manifest.json"
        assert manifest.is_file(), f"[{case.id}] no manifest in {folder}: {listing}"
        assert json.loads(manifest.read_text()).get("status") == "complete", listing
        assert not (folder / "chunks").exists() and not (folder / "shards").exists(), listing
    elif case.state == RESUMABLE:
        assert not (folder / "manifest.json").exists(), f"[{case.id}] a manifest after a failed run: {listing}"
    elif case.state == UNCHANGED:
        assert ctx.snapshot is not None, f"[{case.id}] the builder takes no snapshot"
        ignored = {"log.txt", ".lock"}   # the refusal may be logged; a lock file is no output
        now = snapshot(ctx.out)
        changed = sorted(str(p) for p in ctx.snapshot.keys() | now.keys()
                         if p.name not in ignored and ctx.snapshot.get(p) != now.get(p))
        assert not changed, f"[{case.id}] changed: {changed}"


def check_covered(case: Case) -> None:
    """A case held by another test file: that file exists and tests what the case names."""
    assert case.covered_by is not None
    path = REPO / case.covered_by
    assert path.is_file(), f"[{case.id}] {case.covered_by} does not exist (yet)"
    text = path.read_text()
    missing = [w for w in case.words if not found(w, text)]
    assert not missing, f"[{case.id}] {case.covered_by} does not mention {missing}"
