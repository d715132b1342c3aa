"""`python -m memcirc.report RUN_DIR`: the headline numbers of a finished run, printed last."""

from __future__ import annotations

import sys
from pathlib import Path

from memcirc.artifacts import MANIFEST, SUMMARY_JSON, read_json, read_manifest
from memcirc.errors import InputError
from memcirc.scoring import format_summary


def _summary(stage_dir: Path) -> dict | None:
    """The summary of a finished stage, or None when the stage has not run."""
    if not (stage_dir / MANIFEST).is_file():
        return None
    read_manifest(stage_dir)
    return read_json(stage_dir / SUMMARY_JSON)


def report(run_dir: Path) -> str:
    lines = []
    memorization = _summary(run_dir / "memorization")
    if memorization is None:
        raise InputError(f"{run_dir} holds no finished memorization stage")
    lines += [f"memorization ({run_dir / 'memorization'}): exact-match rate per group",
              format_summary(memorization)]
    contrastive = _summary(run_dir / "contrastive")
    if contrastive:
        lines.append(f"contrastive ({contrastive['mode']}): {contrastive['n_pairs']} pairs "
                     f"({contrastive['n_discovery']} discovery, {contrastive['n_heldout']} held-out) from "
                     f"{contrastive['n_memorized']} memorized windows")
    circuits = _summary(run_dir / "circuits")
    if circuits:
        lines.append(f"circuit: {circuits['minimal_edges']} of {circuits['edges_total']} edges reach "
                     f"faithfulness {circuits['faithfulness']:.3f} on discovery pairs "
                     f"(target {circuits['target']})")
    verify = _summary(run_dir / "verify")
    if verify:
        lines.append(f"held-out: faithfulness {verify['faithfulness_heldout']:.3f}; random circuits of the "
                     f"same size {verify['random_faithfulness_mean']:.3f} ± {verify['random_faithfulness_sd']:.3f}")
    bypass = _summary(run_dir / "bypass")
    if bypass:
        blocks = ", ".join(f"{e['layer']}: {e['exact']:.2f}/{e['ppl']:.1f}" for e in bypass["layers"])
        lines.append(f"attention bypass: baseline exact {bypass['baseline']['exact']:.2f}, ppl "
                     f"{bypass['baseline']['ppl']:.1f}; per block exact/ppl {blocks}")
    kfac = _summary(run_dir / "kfac")
    if kfac:
        for formula in dict.fromkeys(r["formula"] for r in kfac["results"]):
            rows = [r for r in kfac["results"] if r["formula"] == formula]
            curve = ", ".join(f"{r['rho']}: {r['exact_after']:.2f}/{r['ppl_after']:.1f}" for r in rows)
            lines.append(f"K-FAC edit ({formula}): before exact {rows[0]['exact_before']:.2f}, ppl "
                         f"{rows[0]['ppl_before']:.1f}; rho exact/ppl {curve}")
    dynamics = _summary(run_dir / "dynamics")
    if dynamics:
        onset = ", ".join(f"{g}: {v if v is not None else 'never'}" for g, v in dynamics["onset_by_group"].items())
        lines.append(f"training dynamics ({dynamics['n_checkpoints']} checkpoints): memorization onset (median "
                     f"step) {onset}")
        if dynamics["circuits"]:
            per = ", ".join(f"{c['step']}: {_edges(c['circuit_edges'])}/{_num(c['faithfulness_heldout'])}"
                            f"/{_num(c['jaccard_final'])}{'*' if c['ill_conditioned'] else ''}"
                            for c in dynamics["checkpoints"])
            lines.append(f"circuit over training (step: edges/held-out F/Jaccard with final; * ill-conditioned) "
                         f"{per}")
    predict = _summary(run_dir / "predict")
    if predict:
        from memcirc.predict import headline  # sklearn is slow to import; only when the stage ran

        lines.append(headline(predict))
    return "\n".join(lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _edges(x: int | None) -> str:
    return "-" if x is None else str(x)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m memcirc.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        print(report(Path(args[0])))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
