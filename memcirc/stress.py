"""Stress tests for removal (Huang et al. 2024, "Demystifying Verbatim Memorization in LLMs"): an edit
that stops the memorized windows' suffixes under their own prefixes may still let them out under a
slightly different prompt. Memorization (exact, tf_accuracy, lcp; memcirc.scoring) of the memorized
windows is measured under prefix perturbations, before and after an edit, per perturbation.

Perturbations (pure, deterministic given the seed; a window that cannot be perturbed is skipped and
counted):

* `shift-S` / `shift+S`: the whole window S tokens earlier / later in its document. Its suffix moves
  with it: the target is another cut of the same memorized document (needs the document's tokens).
* `prefix+N`: N more document tokens before the prefix, same suffix (needs the document).
* `prefix-N`: the prefix's first N tokens dropped, same suffix.
* `subK`: K prefix tokens replaced by random other tokens, `dropK`: K prefix tokens removed, at
  seeded positions. Never the last prefix token: it is the direct cue of the first suffix token, so a
  change there mostly tests the local next-token statistics; these test the earlier context, and
  `prefix-N` covers the near context.
* `prependN`: N tokens of unrelated text (held-out text, or NEUTRAL_TEXT) before the prefix.

A BOS in front of a window (its `bos_id`) stays in front: perturbations act on the document tokens.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memcirc.data import Window
from memcirc.scoring import score_windows

ORIGINAL = "original"
STRESS_METRICS = ("exact", "tf_accuracy", "lcp")
# a generic unrelated passage, for models without held-out text at hand (tokenized with their tokenizer)
NEUTRAL_TEXT = ("The weather report for the coming week calls for mild temperatures, light winds from the "
                "west and a chance of rain on Thursday afternoon. ")
RESURFACED_IDS = 20        # at most this many window ids listed in a comparison


@dataclass(frozen=True)
class StressPlan:
    """Which perturbations to build (the defaults are the stages' --stress set)."""

    shifts: tuple[int, ...] = (4,)          # each as shift-S and shift+S
    longer: tuple[int, ...] = (8,)
    shorter: tuple[int, ...] = (8, 16)
    substitute: tuple[int, ...] = (1, 2, 3)
    drop: tuple[int, ...] = (1, 2, 3)
    prepend: int = 16                       # tokens of the unrelated passage (0: none)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass
class Perturbation:
    """Perturbed windows and the id of the original window each comes from (in the same order)."""

    name: str
    windows: list[Window] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    n_skipped: int = 0

    def add(self, original: Window, tokens: Sequence[int], prefix_len: int, offset: int) -> None:
        self.windows.append(replace(original, id=f"{original.id}|{self.name}", tokens=np.asarray(tokens, np.int64),
                                    prefix_len=prefix_len, offset=offset))
        self.origins.append(original.id)


# -- builders --------------------------------------------------------------------------------

def _parts(w: Window, bos_id: int | None) -> tuple[list[int], list[int], list[int]]:
    """(BOS head, the prefix's document tokens, the suffix) of a window."""
    tokens = w.tokens.tolist()
    head = tokens[:1] if bos_id is not None and tokens[:1] == [bos_id] and w.prefix_len > 1 else []
    return head, tokens[len(head):w.prefix_len], tokens[w.prefix_len:]


def _document_span(w: Window, documents: Mapping[str, Sequence[int]], bos_id: int | None) -> list[int] | None:
    """The window's document when the window is where its offset says, else None (unknown, or cut with
    another tokenization)."""
    doc = documents.get(w.doc)
    _, prefix, suffix = _parts(w, bos_id)
    if doc is None or list(doc[w.offset:w.offset + len(prefix) + len(suffix)]) != prefix + suffix:
        return None
    return list(doc)


def original(windows: Sequence[Window]) -> Perturbation:
    out = Perturbation(ORIGINAL)
    out.windows, out.origins = list(windows), [w.id for w in windows]
    return out


def shifted(windows: Sequence[Window], documents: Mapping[str, Sequence[int]], s: int,
            bos_id: int | None = None) -> Perturbation:
    """Each window moved `s` tokens inside its document (s < 0: earlier), prefix and suffix lengths kept."""
    out = Perturbation(f"shift{s:+d}")
    for w in windows:
        doc = _document_span(w, documents, bos_id)
        head, prefix, suffix = _parts(w, bos_id)
        start, length = w.offset + s, len(prefix) + len(suffix)
        if doc is None or start < 0 or start + length > len(doc):
            out.n_skipped += 1
            continue
        out.add(w, head + doc[start:start + length], w.prefix_len, start)
    return out


def longer_prefix(windows: Sequence[Window], documents: Mapping[str, Sequence[int]], n: int,
                  bos_id: int | None = None) -> Perturbation:
    """The `n` document tokens before each window put in front of its prefix; same suffix."""
    out = Perturbation(f"prefix+{n}")
    for w in windows:
        doc = _document_span(w, documents, bos_id)
        head, prefix, suffix = _parts(w, bos_id)
        if doc is None or w.offset < n:
            out.n_skipped += 1
            continue
        out.add(w, head + doc[w.offset - n:w.offset] + prefix + suffix, w.prefix_len + n, w.offset - n)
    return out


def shorter_prefix(windows: Sequence[Window], n: int, bos_id: int | None = None) -> Perturbation:
    """Each prefix without its first `n` document tokens (at least one is left); same suffix."""
    out = Perturbation(f"prefix-{n}")
    for w in windows:
        head, prefix, suffix = _parts(w, bos_id)
        if len(prefix) <= n:
            out.n_skipped += 1
            continue
        out.add(w, head + prefix[n:] + suffix, w.prefix_len - n, w.offset + n)
    return out


def _rng(seed: int, window_id: str, what: str) -> np.random.Generator:
    """A window's own random stream: the same draws whatever the other windows are (crc32, not hash():
    Python salts str hashes per process)."""
    return np.random.default_rng([seed, zlib.crc32(window_id.encode()), zlib.crc32(what.encode())])


def _positions(rng: np.random.Generator, n_prefix: int, k: int) -> list[int] | None:
    """k distinct positions among the prefix's document tokens, never the last; None if too few."""
    if n_prefix - 1 < k:
        return None
    return sorted(int(i) for i in rng.choice(n_prefix - 1, size=k, replace=False))


def substituted(windows: Sequence[Window], k: int, vocab_size: int, seed: int = 0,
                bos_id: int | None = None) -> Perturbation:
    """`k` prefix tokens (seeded positions, never the last) replaced by seeded random other tokens
    drawn uniformly from [0, vocab_size)."""
    out = Perturbation(f"sub{k}")
    for w in windows:
        head, prefix, suffix = _parts(w, bos_id)
        rng = _rng(seed, w.id, out.name)
        positions = _positions(rng, len(prefix), k)
        if positions is None:
            out.n_skipped += 1
            continue
        new = list(prefix)
        for i in positions:
            drawn = int(rng.integers(vocab_size - 1))          # uniform over the other vocab_size - 1 ids
            new[i] = drawn + (drawn >= prefix[i])
        out.add(w, head + new + suffix, w.prefix_len, w.offset)
    return out


def dropped(windows: Sequence[Window], k: int, seed: int = 0, bos_id: int | None = None) -> Perturbation:
    """`k` prefix tokens (seeded positions, never the last) removed; same suffix."""
    out = Perturbation(f"drop{k}")
    for w in windows:
        head, prefix, suffix = _parts(w, bos_id)
        positions = _positions(_rng(seed, w.id, out.name), len(prefix), k)
        if positions is None:
            out.n_skipped += 1
            continue
        kept = [t for i, t in enumerate(prefix) if i not in positions]
        out.add(w, head + kept + suffix, w.prefix_len - k, w.offset)
    return out


def prepended(windows: Sequence[Window], passage: Sequence[int], bos_id: int | None = None) -> Perturbation:
    """The `passage` tokens (unrelated text) put before each prefix, after a BOS; same suffix."""
    out = Perturbation(f"prepend{len(passage)}")
    for w in windows:
        head, prefix, suffix = _parts(w, bos_id)
        out.add(w, head + list(passage) + prefix + suffix, w.prefix_len + len(passage), w.offset)
    return out


def neutral_passage(tokenizer: Any, n: int) -> list[int]:
    """The first `n` tokens of NEUTRAL_TEXT (repeated as needed) in `tokenizer`'s ids."""
    from memcirc.models.tokenizer import encode

    ids = encode(tokenizer, NEUTRAL_TEXT)
    return (ids * (n // max(len(ids), 1) + 1))[:n]


def build(windows: Sequence[Window], plan: StressPlan, *, documents: Mapping[str, Sequence[int]],
          vocab_size: int, passage: Sequence[int] = (), bos_id: int | None = None,
          max_len: int | None = None) -> list[Perturbation]:
    """The original windows and every perturbation of `plan`; windows longer than `max_len` (the
    model's context) are skipped and counted."""
    out = [original(windows)]
    for s in plan.shifts:
        out += [shifted(windows, documents, -s, bos_id), shifted(windows, documents, s, bos_id)]
    out += [longer_prefix(windows, documents, n, bos_id) for n in plan.longer]
    out += [shorter_prefix(windows, n, bos_id) for n in plan.shorter]
    out += [substituted(windows, k, vocab_size, plan.seed, bos_id) for k in plan.substitute]
    out += [dropped(windows, k, plan.seed, bos_id) for k in plan.drop]
    if plan.prepend and passage:
        out.append(prepended(windows, list(passage)[:plan.prepend], bos_id))
    return [_fitting(p, max_len) for p in out]


def _fitting(p: Perturbation, max_len: int | None) -> Perturbation:
    if max_len is None:
        return p
    keep = [i for i, w in enumerate(p.windows) if len(w.tokens) <= max_len]
    return Perturbation(p.name, [p.windows[i] for i in keep], [p.origins[i] for i in keep],
                        p.n_skipped + len(p.windows) - len(keep))


# -- evaluation ------------------------------------------------------------------------------

Scores = dict[str, list[dict[str, Any]]]    # perturbation -> score_windows rows, in its windows' order


def score(model: torch.nn.Module, perturbations: Sequence[Perturbation], *, pad_id: int,
          batch_size: int = 32) -> Scores:
    """Teacher-forced memorization rows of every perturbation's windows, one score_windows call each."""
    return {p.name: score_windows(model, p.windows, pad_id=pad_id, batch_size=batch_size,
                                  metrics=STRESS_METRICS) if p.windows else [] for p in perturbations}


def _means(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    return {m: round(float(np.mean([float(r[m]) for r in rows])), 6) if rows else None for m in STRESS_METRICS}


def table(perturbations: Sequence[Perturbation], scores: Scores) -> dict[str, dict[str, Any]]:
    """{perturbation: {n, n_skipped, exact, tf_accuracy, lcp}} (means over its windows; None if none)."""
    return {p.name: {"n": len(p.windows), "n_skipped": p.n_skipped, **_means(scores[p.name])}
            for p in perturbations}


def _exact_by_origin(p: Perturbation, rows: Sequence[dict[str, Any]]) -> dict[str, bool]:
    return {o: bool(r["exact"]) for o, r in zip(p.origins, rows, strict=True)}


def compare(perturbations: Sequence[Perturbation], before: Scores, after: Scores) -> dict[str, Any]:
    """Per perturbation: before / after means, `survival` (exact after / before: the fraction of the
    memorization that survives the edit), `removed` (of its windows exact before, the fraction not
    exact after), `unperturbed_after` (exact after the edit of the unperturbed windows these come from:
    a perturbation that skips windows is held against the same windows) and `n_resurfaced` (see
    below). Then whether the removal holds (`passes`): no perturbation's exact after above its
    unperturbed_after (`exceeds_original` lists those), and no window
    `resurfaced`: an original the standard test calls removed (not exact after the edit) that a
    perturbation of it still reproduces exactly after the edit."""
    base = next(p for p in perturbations if p.name == ORIGINAL)
    unperturbed = _exact_by_origin(base, after[ORIGINAL])
    gone = {o for o, e in unperturbed.items() if not e}
    rows: dict[str, Any] = {}
    came_back: set[str] = set()
    for p in perturbations:
        b, a = _means(before[p.name]), _means(after[p.name])
        b_exact, a_exact = b["exact"], a["exact"]
        was = [bool(r["exact"]) for r in before[p.name]]
        still = [bool(r["exact"]) for r in after[p.name]]
        n_was = sum(was)
        back = {o for o, e in _exact_by_origin(p, after[p.name]).items() if e and o in gone}
        came_back |= back
        rows[p.name] = {"n": len(p.windows), "n_skipped": p.n_skipped, "before": b, "after": a,
                        "survival": round((a_exact or 0.0) / b_exact, 6) if b_exact else None,
                        "removed": round(sum(w and not s for w, s in zip(was, still)) / n_was, 6) if n_was else None,
                        "unperturbed_after": round(float(np.mean([unperturbed[o] for o in p.origins])), 6)
                        if p.origins else None, "n_resurfaced": len(back)}
    n = len(base.windows)
    worse = [name for name, r in rows.items() if r["n"] and r["after"]["exact"] > r["unperturbed_after"]]
    return {"perturbations": rows, "n_windows": n,
            "removed_standard": round(len(gone) / n, 6) if n else None,
            "removed_under_stress": round((len(gone) - len(came_back)) / n, 6) if n else None,
            "n_resurfaced": len(came_back), "resurfaced": sorted(came_back)[:RESURFACED_IDS],
            "exceeds_original": worse, "passes": not worse and not came_back}


# -- the documents of a memorization run -----------------------------------------------------

UPSTREAM_HOPS = 8     # a memorization run re-scoring another's windows (--input-dir) names that run


def upstream_documents(stage_dir: Path, wanted: set[str], tokenizer: Any) -> dict[str, list[int]]:
    """The document tokens of the `wanted` doc ids, read from the dataset the memorization run in
    `stage_dir` cut its windows from (following --input-dir re-scorings), tokenized as make_windows
    does (a token document without its leading BOS). {} when no dataset is known (a --memorized-file)."""
    from memcirc.config import testbed_data
    from memcirc.data import Columns, load_documents
    from memcirc.manifest import read_manifest
    from memcirc.models.tokenizer import BosPolicy, encode

    config: dict[str, Any] = {}
    for _ in range(UPSTREAM_HOPS):
        manifest = read_manifest(stage_dir, what="memorization")
        config = manifest.get("config") or {}
        if not config.get("input_dir"):
            break
        stage_dir = Path(config["input_dir"])
    if not config.get("dataset") or not wanted:
        return {}
    bos = ((manifest.get("windows") or {}).get("bos") or {}).get("bos_token_id")
    policy = BosPolicy("auto", bos)
    columns = Columns(text=config.get("text_column", "text"), tokens=config.get("token_column"),
                      group=config.get("group_column", "group"), doc=config.get("doc_column"))
    docs = load_documents(testbed_data("dataset", config["dataset"]), columns, split=config.get("split", "train"),
                          dataset_config=config.get("dataset_config"), streaming=bool(config.get("streaming")))
    found: dict[str, list[int]] = {}
    for d in docs:
        if d.doc in wanted and d.doc not in found:
            found[d.doc] = policy.strip(d.tokens) if d.tokens is not None else encode(tokenizer, d.text or "")
            if len(found) == len(wanted):
                break    # a large dataset is read only as far as the last wanted document
    return found


# -- a stage's stress test (kfac_edit, attention_bypass with --stress) -----------------------

@dataclass
class StressRun:
    """The perturbed windows of a stage's memorized windows, their scores before the edit, and what
    the summary records of how they were built."""

    perturbations: list[Perturbation]
    setup: dict[str, Any]
    pad_id: int
    batch_size: int
    before: Scores = field(default_factory=dict)

    def measure_before(self, model: torch.nn.Module) -> None:
        """Score on the unedited model (call before the edit is applied)."""
        self.before = score(model, self.perturbations, pad_id=self.pad_id, batch_size=self.batch_size)

    def result(self, model: torch.nn.Module, edit: dict[str, Any]) -> dict[str, Any]:
        """The summary's `stress` block: score on the model as edited now, compared with before."""
        after = score(model, self.perturbations, pad_id=self.pad_id, batch_size=self.batch_size)
        return {"edit": edit, **self.setup, **compare(self.perturbations, self.before, after)}


def stage_stress(loaded: Any, windows: Sequence[Window], upstream_dir: Path | None, heldout: Sequence[np.ndarray],
                 *, pad_id: int, batch_size: int, plan: StressPlan = StressPlan(), documents: bool = True) -> StressRun:
    """The default perturbations of a stage's memorized windows: documents from the memorization run
    in `upstream_dir` (None, or `documents` False for windows of another file: shifts and longer
    prefixes are all skipped; its BOS id is still the windows'), the prepended passage from
    the first held-out block (else NEUTRAL_TEXT), windows longer than the model's context skipped.
    `loaded`: a memcirc.models.LoadedModel."""
    from memcirc.manifest import read_manifest
    from memcirc.models.arch import embedding_rows, n_ctx

    manifest = read_manifest(upstream_dir, what="memorization") if upstream_dir is not None else {}
    bos_id = ((manifest.get("windows") or {}).get("bos") or {}).get("bos_token_id")
    docs = (upstream_documents(upstream_dir, {w.doc for w in windows}, loaded.tokenizer)
            if upstream_dir is not None and documents else {})
    passage, passage_from = neutral_passage(loaded.tokenizer, plan.prepend), "neutral text"
    if heldout:
        block = heldout[0].tolist()
        block = block[1:] if bos_id is not None and block[:1] == [bos_id] else block
        if len(block) >= plan.prepend:
            passage, passage_from = block[:plan.prepend], "held-out text"
    vocab = min(embedding_rows(loaded.model), len(loaded.tokenizer))
    perturbations = build(windows, plan, documents=docs, vocab_size=vocab, passage=passage, bos_id=bos_id,
                          max_len=n_ctx(loaded.model))
    setup = {"plan": plan.to_dict(), "metrics": list(STRESS_METRICS), "n_documents": len(docs),
             "prepended": passage_from, "substitute_vocab": vocab}
    return StressRun(perturbations, setup, pad_id, batch_size)
