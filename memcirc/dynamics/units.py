"""One checkpoint unit of a training-dynamics sweep: its fingerprint, its state, and computing it.

Each checkpoint is an independent unit (`<stage>/checkpoints/<index:05d>/`), so it can be one SLURM
array task:

* `scores.jsonl`: the upstream memorization run's windows re-scored by this checkpoint (teacher-
  forced metrics, plus `memorized_by` when it needs generation); scoring resumes chunk by chunk;
* with circuits (the contrastive stage's pairs, made with the final model): `prune_scores.safetensors`
  (EAP-IG on the discovery pairs) and `circuit.json` (the minimal circuit reaching `target` on the
  discovery pairs and its faithfulness on the held-out pairs, with M(full) and M(empty) of both splits);
* with head scores (`heads`): `heads.json`, every attention head's component scores and the loss on
  repeated random tokens at this checkpoint (`memcirc.heads.scores.head_scores`);
* `done.json` last: the unit's fingerprint, label, step, model identity and architecture signature.

A unit whose `done.json` matches its fingerprint is skipped; a killed unit has none and is recomputed
(its finished scoring chunks are kept). A unit depends only on its checkpoint and the inputs every
unit shares (`UnitSpec`), never on another unit, so its files are the same whether computed in one
process or as array tasks.

All checkpoints must share one architecture and tokenizer (`signature`); `check_same_architecture`
compares them on their config and tokenizer files before any weights are read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.numpy import load_file

from memcirc import artifacts as art
from memcirc.bootstrap import pair_bootstrap
from memcirc.circuits import (
    CIRCUIT_JSON,
    PRUNE_SCORES,
    RANKING,
    FaithfulnessEvaluator,
    build_graph,
    discover_circuit,
    make_batches,
    prune_scores_metadata,
    save_prune_scores,
)
from memcirc.data import ScoredWindow, Window
from memcirc.dynamics.checkpoints import Checkpoint
from memcirc.errors import InputError
from memcirc.models import LoadedModel, ModelSpec, load, resolve_device, resolve_dtype
from memcirc.models.device import dtype_name
from memcirc.models.identity import signature, weights_key
from memcirc.models.loading import load_config_and_tokenizer, local_weights_sha256
from memcirc.option_groups import CircuitOptions
from memcirc.pairs import Pair
from memcirc.scoring import GENERATION_METRICS, TEACHER_FORCED_METRICS, score_windows
from memcirc.sharding import run_chunked
from memcirc.stages.registry import DONE_MARKER
from memcirc.tasks.source import accuracy

log = logging.getLogger(__name__)

METHOD_VERSION = 1
HEADS_VERSION = 1
HEADS_JSON = "heads.json"
UNITS_DIR = "checkpoints"          # <stage>/checkpoints/<index:05d>/
UNIT_DONE = DONE_MARKER            # written last in a unit folder
CIRCUIT_KEYS = tuple(f.name for f in dataclasses.fields(CircuitOptions))


def unit_dir(stage_dir: Path, index: int) -> Path:
    return Path(stage_dir) / UNITS_DIR / f"{index:05d}"


# -- architecture and tokenizer ------------------------------------------------------------

def checkpoint_signature(spec: ModelSpec) -> dict[str, Any]:
    """`memcirc.models.identity.signature` from the config and tokenizer files only (no weights are read)."""
    return signature(*load_config_and_tokenizer(spec))


def signature_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """How two signatures differ, in words; None when they are equal."""
    diff = [k for k in a if a.get(k) != b.get(k)]
    if not diff:
        return None
    if "tokenizer_sha256" in diff and len(diff) == 1:
        return f"tokenizer (vocabulary sha256 {a['tokenizer_sha256'][:12]} vs {b['tokenizer_sha256'][:12]})"
    return ", ".join(f"{k} {a.get(k)} vs {b.get(k)}" for k in diff if k != "tokenizer_sha256")


def check_same_architecture(checkpoints: Sequence[Checkpoint], signatures: Sequence[dict[str, Any]]) -> None:
    """InputError naming the first checkpoint that differs from the last one (architecture or tokenizer)."""
    ref, ref_sig = checkpoints[-1], signatures[-1]
    for ckpt, sig in zip(checkpoints, signatures, strict=True):
        if (diff := signature_difference(sig, ref_sig)) is not None:
            raise InputError(f"checkpoints {ckpt.label!r} (index {ckpt.index}) and {ref.label!r} (index {ref.index}) "
                             f"differ in {diff}: all checkpoints must share one architecture and tokenizer")


def check_upstream_model(recorded: dict[str, Any] | None, final_sig: dict[str, Any], what: str) -> None:
    """The model that made an upstream artifact (windows, pairs) must share the checkpoints' tokenizer."""
    recorded = recorded or {}
    candidates = [(recorded.get("name_or_path"), recorded.get("revision")),
                  (recorded.get("local_path"), None)]
    for name, revision in candidates:
        if not name:
            continue
        try:
            sig = checkpoint_signature(ModelSpec(str(name), revision=revision, device="cpu"))
        except InputError:
            continue
        if sig["tokenizer_sha256"] != final_sig["tokenizer_sha256"] or sig["d_vocab"] != final_sig["d_vocab"]:
            raise InputError(f"the {what} were made with model {recorded.get('name_or_path')!r}, whose tokenizer "
                             "differs from the checkpoints'; rebuild them with a checkpoint of this run")
        return
    log.warning("cannot read the model the %s were made with (%r); their token ids are only checked against "
                "the vocabulary size", what, recorded.get("name_or_path"))


# -- what every unit shares ------------------------------------------------------------------

def unit_metrics(memorized_by: str) -> tuple[str, ...]:
    """The scores.jsonl columns of a unit: the teacher-forced metrics, plus `memorized_by` if it needs generation."""
    extra = (memorized_by,) if memorized_by in GENERATION_METRICS else ()
    return (*TEACHER_FORCED_METRICS, *extra)


@dataclass(frozen=True)
class UnitSpec:
    """What every checkpoint unit of one sweep computes, and from what (read and checked by the stage).

    Attributes:
        model: how each checkpoint is loaded (dtype, device, ...); its name and revision are the checkpoint's.
        windows: the upstream memorization run's windows, re-scored by every checkpoint.
        windows_run_id: that run's run_id.
        metrics: the scores.jsonl columns (`unit_metrics`).
        final_signature: the last checkpoint's architecture signature, which every checkpoint must share.
        seed, limit: recorded in the fingerprint (the windows are already cut to `limit`).
        batch_size, chunk_size: windows / pairs per batch; windows per resumable scoring chunk.
        circuit, pairs, pairs_sha: how to find each checkpoint's circuit, on which pairs; None: memorization only.
        heads: compute the head component scores (heads.json).
        prepend_bos: the --prepend-bos of the head scores' repeated sequences.
    """

    model: ModelSpec
    windows: Sequence[ScoredWindow]
    windows_run_id: str
    metrics: tuple[str, ...]
    final_signature: dict[str, Any]
    seed: int
    limit: int | None
    batch_size: int
    chunk_size: int
    circuit: CircuitOptions | None = None
    pairs: Sequence[Pair] | None = None
    pairs_sha: str | None = None
    heads: bool = False
    prepend_bos: str = "auto"


def unit_fingerprint(spec: UnitSpec, ckpt: Checkpoint) -> str:
    """What a unit's files depend on: the checkpoint, precision, windows, metrics and circuit method.

    A local checkpoint folder is its weights' content hash (new weights there: the unit is recomputed;
    the same weights elsewhere: not), a Hub checkpoint its name and revision. Not its index, label or
    step (the merge takes those from the current checkpoint list).

    Raises:
        InputError: a local checkpoint folder without safetensors weights (nothing is written yet).
    """
    model = spec.model
    dtype = dtype_name(resolve_dtype(model.dtype, resolve_device(model.device)))
    circuits = None
    if spec.circuit is not None:
        circuits = {k: getattr(spec.circuit, k) for k in CIRCUIT_KEYS} | {"pairs_sha256": spec.pairs_sha}
    heads = {"version": HEADS_VERSION, "prepend_bos": spec.prepend_bos} if spec.heads else None
    sha = local_weights_sha256(ckpt.spec(model))
    source = {"weights_sha256": sha} if sha else {"name_or_path": ckpt.name_or_path, "revision": ckpt.revision}
    return art.sha256_json({"method": METHOD_VERSION, **source, "gguf_file": model.gguf_file, "dtype": dtype,
                            "attn_implementation": model.attn_implementation, "seed": spec.seed,
                            "windows_run_id": spec.windows_run_id, "limit": spec.limit,
                            "metrics": list(spec.metrics), "circuits": circuits,
                            "heads": heads})


def unit_status(directory: Path, fingerprint: str) -> str:
    """'done' (done.json of this fingerprint, files intact), 'other' (done for another config) or 'todo'."""
    path = directory / UNIT_DONE
    if not path.is_file():
        return "todo"
    try:
        marker = json.loads(path.read_bytes())
    except (OSError, ValueError):   # cut or not UTF-8: the unit is recomputed
        return "todo"
    if not isinstance(marker, dict):
        return "todo"
    if marker.get("fingerprint") != fingerprint:
        return "other"
    for name, sha in marker.get("outputs", {}).items():
        if not (directory / name).is_file() or art.sha256_file(directory / name) != sha:
            log.warning("%s changed after its unit finished; the unit is recomputed", directory / name)
            return "todo"
    return "done"


# -- computing one unit ----------------------------------------------------------------------

def _unit_row(row: dict[str, Any], metrics: Sequence[str]) -> dict[str, Any]:
    out = {"id": row["id"], "doc": row["doc"]}
    if "group" in row:
        out["group"] = row["group"]
    return out | {m: row[m] for m in metrics if m in row}


def _unit_circuit(opts: CircuitOptions, pairs: Sequence[Pair], pairs_sha: str, loaded: LoadedModel,
                  directory: Path, *, batch_size: int, limit: int | None, seed: int) -> dict[str, Any]:
    """Attribution, minimal circuit (discovery pairs) and held-out faithfulness of one checkpoint.

    Writes prune_scores.safetensors and circuit.json; returns circuit.json without its edge list.
    Undefined faithfulness (M(full) = M(empty)) is recorded, not raised: early checkpoints can be there.
    """
    graph = build_graph(loaded, opts.weight_processing)
    discovery = [p for p in pairs if p.split == "discovery"]
    heldout = [p for p in pairs if p.split == "heldout"]
    # undefined faithfulness on the discovery pairs comes back as `found.note`, not raised
    # the resamples find_circuits draws for these pairs: the final checkpoint's circuit is its circuit
    boot = pair_bootstrap(len(discovery), opts.bootstrap_resamples, opts.interval_level, seed)
    found = discover_circuit(graph, make_batches(discovery, batch_size, loaded.device), opts, boot=boot)
    result: dict[str, Any] = {
        "edges_total": graph.n_edges, "n_discovery": len(discovery), "n_heldout": len(heldout),
        "metric": opts.faithfulness_metric, "ablation": opts.ablation, "target": opts.target,
        "selected_by": found.search.selected_by if found.search is not None else opts.select_by,
        "minimal_edges": None, "faithfulness_discovery": None, "faithfulness_heldout": None,
        "metric_full": None, "metric_empty": None, "heldout_metric_full": None, "heldout_metric_empty": None,
        "monotone": None, "non_monotone_steps": [], "curve": [], "notes": [], "accuracy": None,
        "heldout_accuracy": None}
    if found.note is not None:
        result["notes"].append(f"discovery: {found.note}")
    if found.evaluator is not None and found.search is not None:
        search, k = found.search, found.search.minimal_edges
        result.update(metric_full=found.evaluator.m_full, metric_empty=found.evaluator.m_empty, minimal_edges=k,
                      accuracy=accuracy(found.evaluator.full_per_pair),
                      faithfulness_discovery=search.faithfulness, monotone=search.monotone,
                      non_monotone_steps=search.non_monotone_steps,
                      curve=[{"edges": e, "faithfulness": f} for e, f in search.evaluated])
        if heldout:
            try:
                held = FaithfulnessEvaluator(graph, make_batches(heldout, batch_size, loaded.device),
                                             opts.ablation, opts.faithfulness_metric)
                result.update(faithfulness_heldout=float(held.at_counts(found.ranking, [k])[0]),
                              heldout_metric_full=held.m_full, heldout_metric_empty=held.m_empty,
                              heldout_accuracy=accuracy(held.full_per_pair))
            except InputError as e:
                result["notes"].append(f"heldout: {e}")
        else:
            result["notes"].append("no held-out pairs")
    save_prune_scores(directory / PRUNE_SCORES, graph, found.scores, prune_scores_metadata(
        graph, opts, model=weights_key(loaded), pairs_sha256=pairs_sha, n_pairs=len(discovery), limit=limit))
    art.write_json(directory / CIRCUIT_JSON, {**result, "ranking": RANKING, "circuit": found.edges})
    return result


def _unit_heads(loaded: LoadedModel, prepend_bos: str, seed: int, directory: Path) -> dict[str, Any]:
    """Every head's component scores and the repeated-token loss at this checkpoint (heads.json)."""
    from memcirc.heads.scores import head_scores
    from memcirc.models.tl import to_hooked_transformer
    from memcirc.models.tokenizer import bos_policy
    from memcirc.tasks.generators import ordinary_tokens

    tl = to_hooked_transformer(loaded, "none")
    result = head_scores(tl, loaded.tokenizer, ordinary_tokens(loaded.tokenizer),
                         bos_policy(loaded.tokenizer, prepend_bos), seed)
    art.write_json(directory / HEADS_JSON, result)
    return result


def _load_checkpoint(spec: UnitSpec, ckpt: Checkpoint) -> tuple[LoadedModel, dict[str, Any]]:
    """The checkpoint's weights and its signature, which must be the final checkpoint's."""
    loaded = load(ckpt.spec(spec.model))
    sig = signature(loaded.model.config, loaded.tokenizer)
    if (diff := signature_difference(sig, spec.final_signature)) is not None:
        raise InputError(f"checkpoint {ckpt.label!r} (index {ckpt.index}) loaded with {diff} unlike the final "
                         "checkpoint")
    return loaded, sig


def run_unit(spec: UnitSpec, ckpt: Checkpoint, directory: Path, fingerprint: str) -> dict[str, Any]:
    """Compute one checkpoint's unit in `directory` (scores, then circuits); write its done.json last.

    Returns the done.json marker."""
    torch.manual_seed(spec.seed)
    loaded, sig = _load_checkpoint(spec, ckpt)   # first: a checkpoint that cannot load leaves no unit folder
    art.ensure_writable(directory)
    (directory / UNIT_DONE).unlink(missing_ok=True)   # a unit of another config is replaced, never mixed
    art.clean_stale_temp_files(directory)
    # load() gives a tokenizer without a pad token eos as pad; the stubs type special-token ids as str | list[str]
    pad = cast(int, loaded.tokenizer.pad_token_id)

    def work(batch: Sequence[Window]) -> list[dict[str, Any]]:
        rows = score_windows(loaded.model, batch, pad_id=pad, batch_size=spec.batch_size, metrics=spec.metrics)
        return [_unit_row(r, spec.metrics) for r in rows]

    store = art.ChunkStore(directory / art.CHUNKS_DIR, fingerprint)
    data = run_chunked(list(spec.windows), work, store, spec.chunk_size, f"scoring {ckpt.label}")
    art.atomic_write_bytes(directory / art.SCORES_JSONL, data)
    names = [art.SCORES_JSONL]
    circuit = None
    if spec.circuit is not None:
        assert spec.pairs is not None and spec.pairs_sha is not None
        circuit = _unit_circuit(spec.circuit, spec.pairs, spec.pairs_sha, loaded, directory,
                                batch_size=spec.batch_size, limit=spec.limit, seed=spec.seed)
        names += [PRUNE_SCORES, CIRCUIT_JSON]
    if spec.heads:
        _unit_heads(loaded, spec.prepend_bos, spec.seed, directory)
        names.append(HEADS_JSON)
    marker = {"fingerprint": fingerprint, "index": ckpt.index, "label": ckpt.label, "step": ckpt.step,
              "checkpoint": ckpt.as_dict(), "model": loaded.identity(), "signature": sig,
              "n_windows": len(spec.windows), "outputs": {n: art.sha256_file(directory / n) for n in names}}
    if circuit is not None:
        marker["circuit"] = {k: circuit[k] for k in ("minimal_edges", "faithfulness_discovery",
                                                     "faithfulness_heldout", "metric_full", "metric_empty")}
    art.write_json(directory / UNIT_DONE, marker)
    art.remove_tree(directory / art.CHUNKS_DIR)
    _log_unit(ckpt, data, circuit)
    return marker


def _log_unit(ckpt: Checkpoint, scores: bytes, circuit: dict[str, Any] | None) -> None:
    exact = float(np.mean([json.loads(line)["exact"] for line in scores.splitlines()]))
    log.info("checkpoint %d (%s, step %d) done: exact-match rate %.3f%s", ckpt.index, ckpt.label, ckpt.step,
             exact, "" if circuit is None else f"; circuit {circuit['minimal_edges']} of {circuit['edges_total']} "
             f"edges, faithfulness {_fmt(circuit['faithfulness_discovery'])} discovery / "
             f"{_fmt(circuit['faithfulness_heldout'])} held-out")


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def read_unit_circuit(directory: Path) -> tuple[dict[str, Any], set[str] | None, np.ndarray]:
    """A finished unit's circuit.json, its circuit's edge set (None when undefined), and its prune
    scores as one float64 vector (modules in sorted order)."""
    circuit = art.read_json(directory / CIRCUIT_JSON)
    edges = {e["edge"] for e in circuit["circuit"]} if circuit["minimal_edges"] is not None else None
    tensors = load_file(str(directory / PRUNE_SCORES))
    return circuit, edges, np.concatenate([tensors[k].reshape(-1).astype(np.float64) for k in sorted(tensors)])
