"""The model card of kfac_edit's edited_model/ folder (README.md): the source model, what was edited,
and what the edit measured. The YAML front matter holds the numbers exactly as summary.json has them
(under `memcirc:`), the text shows them rounded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from memcirc import artifacts as art

CARD = "README.md"
SOURCE_KEYS = ("name_or_path", "revision", "commit_hash", "gguf_file", "model_type", "family", "dtype", "n_params")
EDIT_KEYS = ("formula", "rho", "kept_fraction", "kept_importance")
MEASURED_KEYS = ("exact_before", "exact_after", "loose_before", "loose_after", "ppl_before", "ppl_after")


def card_data(summary: dict[str, Any], identity: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """The card's `memcirc:` front matter from the stage summary, the model identity and the memcirc
    version/commit (`provenance`)."""
    saved = summary["saved"]
    return {
        "source_model": {k: identity.get(k) for k in SOURCE_KEYS},
        "edit": {"method": "K-FAC eigenbasis edit (Merullo et al. 2025, arXiv 2510.24256)",
                 "layers": summary["layers"], "projections": summary["projections"], "modules": summary["modules"],
                 **{k: saved[k] for k in EDIT_KEYS if k in saved}, "labels": summary["labels"],
                 "factor_tokens": summary["factor_tokens"], "damping": summary["damping"]},
        "measured": {**{k: saved[k] for k in MEASURED_KEYS}, "memorized_windows": summary["n_memorized"],
                     "heldout": summary["heldout"], "ppl_blocks": summary["n_ppl_blocks"],
                     "ppl_block_len": summary["ppl_block_len"]},
        "warnings": list(summary.get("warnings", [])),
        "produced_by": provenance,
    } | ({"lm_eval": summary["lm_eval"]} if summary.get("lm_eval") else {})


def render(data: dict[str, Any]) -> str:
    """README.md: YAML front matter (Hub metadata + `memcirc:`), then the card in words."""
    src, edit, m = data["source_model"], data["edit"], data["measured"]
    front = yaml.safe_dump({"library_name": "transformers", "tags": ["memcirc", "kfac-edit", "memorization"],
                            "memcirc": data}, sort_keys=False, allow_unicode=True)
    origin = ", ".join(f"{k} {src[k]}" for k in ("revision", "commit_hash", "gguf_file") if src.get(k))
    by = data["produced_by"]
    lines = [
        f"---\n{front}---",
        f"# {src['name_or_path']}, K-FAC edited to remove memorization",
        "",
        f"Source model: `{src['name_or_path']}`" + (f" ({origin})" if origin else "")
        + f"; {src['family']} ({src['model_type']}), {src['n_params']:,} parameters, saved as {src['dtype']}.",
        "",
        f"Edit: {edit['method']}. Blocks {', '.join(map(str, edit['layers']))}, projections "
        f"{', '.join(edit['projections'])} ({len(edit['modules'])} modules); importance formula `{edit['formula']}`, "
        f"rho = {edit['rho']} (kept {edit.get('kept_fraction', float('nan')):.4f} of the components); factors from "
        f"{edit['factor_tokens']:,} tokens, {edit['labels']} labels, damping {edit['damping']}.",
        "",
        f"Measured by memcirc on {m['memorized_windows']} memorized windows and {m['ppl_blocks']} held-out blocks "
        f"of up to {m['ppl_block_len']} tokens of `{m['heldout']}`:",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| exact match | {m['exact_before']:.4f} | {m['exact_after']:.4f} |",
        f"| loose match | {m['loose_before']:.4f} | {m['loose_after']:.4f} |",
        f"| held-out perplexity | {m['ppl_before']:.3f} | {m['ppl_after']:.3f} |",
        "",
    ]
    if "lm_eval" in data:
        lines += ["lm-evaluation-harness results before and after: `memcirc.lm_eval` in the front matter above.", ""]
    lines += [f"**Warning:** {w}\n" for w in data["warnings"]]
    commit = (by.get("commit") or "unknown") + (", uncommitted changes" if by.get("dirty") else "")
    lines.append(f"Produced by memcirc {by.get('memcirc')} (commit {commit}), stage kfac_edit; the full record "
                 "is kfac/summary.json and kfac/manifest.json of the run.")
    return "\n".join(lines) + "\n"


def write_card(directory: Path, data: dict[str, Any]) -> None:
    art.atomic_write_text(directory / CARD, render(data))


def read_card(path: Path) -> dict[str, Any]:
    """The `memcirc:` front matter of a card written by `write_card`."""
    text = Path(path).read_text()
    return yaml.safe_load(text.split("---\n")[1])["memcirc"]
