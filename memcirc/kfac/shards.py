"""Factor shards of a SLURM job array: each array task collects the float64 factor sums of its slice
of the factor batches into shards/<i>/, and the `--merge` job adds them up in shard order (so the
merged factors equal a one-job run's)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from memcirc import artifacts as art
from memcirc.errors import InputError
from memcirc.kfac.factors import FACTORS_FILE, Factors, load_factors
from memcirc.kfac.resume import FactorCollection
from memcirc.sharding import read_marker, shard_bounds, shard_damage
from memcirc.stages.registry import DONE_MARKER

log = logging.getLogger(__name__)


KEYS = ("fingerprint", "num_shards", "shard_index", "n_tokens")   # what a factor shard's done marker holds


def _damage(shard_dir: Path, done: dict[str, Any]) -> str | None:
    """Why the shard's factors do not match its done marker (a shard without tokens has no file)."""
    return shard_damage(shard_dir / FACTORS_FILE, done) if done.get("n_tokens") else None


def collect_shard(collection: FactorCollection, shard: tuple[int, int], shard_dir: Path, meta: dict[str, Any],
                  *, labels: str, force: bool) -> None:
    """One array task: the float64 factor sums of its slice of the batches, then its done marker
    (`force`: recollect a finished shard)."""
    num_shards, shard_index = shard
    marker = shard_dir / DONE_MARKER
    done = read_marker(marker, KEYS)
    if done is not None and not force:
        if (done["fingerprint"] == collection.fingerprint and done["num_shards"] == num_shards
                and _damage(shard_dir, done) is None):
            log.info("factor shard %d/%d is done for this config (%s); nothing to do", shard_index, num_shards,
                     shard_dir)
            return
    marker.unlink(missing_ok=True)
    first, last = shard_bounds(len(collection.batches), num_shards, shard_index)
    entry = {"fingerprint": collection.fingerprint, "num_shards": num_shards, "shard_index": shard_index,
             "batches": [first, last]}
    if last <= first:   # more shards than factor batches: this one has nothing to add
        art.write_json(marker, {**entry, "n_tokens": 0})
        log.info("factor shard %d/%d: no batches (the factor data holds %d); nothing to collect", shard_index,
                 num_shards, len(collection.batches))
        return
    log.info("collecting K-FAC factors (%s labels), shard %d/%d: batches %d..%d of %d", labels, shard_index,
             num_shards, first, last - 1, len(collection.batches))
    sums = collection.resumable(first, last, shard_dir / art.CHUNKS_DIR, f"factors shard {shard_index}")
    sums.meta = meta
    sums.save(shard_dir / FACTORS_FILE, collection.identity, collection.targets)
    art.write_json(marker, {**entry, "n_tokens": sums.n_tokens,
                            "sha256": art.sha256_file(shard_dir / FACTORS_FILE)})
    art.remove_tree(shard_dir / art.CHUNKS_DIR)
    log.info("factor shard %d/%d done (%d tokens); run with --merge once all shards are done", shard_index,
             num_shards, sums.n_tokens)


def merge_shards(shards_dir: Path, fingerprint: str, num_shards: int | None) -> tuple[Factors | None, int]:
    """The float64 sum of every factor shard in `shards_dir`, in shard order (None when no shard holds
    tokens), and the shard count (`num_shards`, else the shards' own); InputError unless all are there
    for this config (`fingerprint`)."""
    done = [d for p in sorted(shards_dir.glob(f"*/{DONE_MARKER}"))
            if (d := read_marker(p, KEYS)) is not None]
    if not done:
        raise InputError(f"no finished factor shards in {shards_dir}: run the shard jobs first, then --merge")
    count = int(num_shards or done[0]["num_shards"])
    done = [d for d in done if d["num_shards"] == count]
    stale = sorted(d["shard_index"] for d in done if d["fingerprint"] != fingerprint)
    if stale:
        raise InputError(f"factor shards {stale} in {shards_dir} come from another config; re-run the shard "
                         "jobs with this config, then --merge")
    missing = sorted(set(range(count)) - {d["shard_index"] for d in done})
    if missing:
        raise InputError(f"factor shards {missing} of {count} have not finished; re-run them, then --merge")
    for d in done:
        if (why := _damage(shards_dir / f"{d['shard_index']:05d}", d)) is not None:
            raise InputError(f"factor shard {d['shard_index']} is damaged ({why}): re-run it (--shard-index "
                             f"{d['shard_index']}), then --merge")
    total: Factors | None = None
    for d in sorted(done, key=lambda d: d["shard_index"]):
        if d["n_tokens"]:
            sums, _, _ = load_factors(shards_dir / f"{d['shard_index']:05d}" / FACTORS_FILE)
            total = sums if total is None else total + sums
    return total, count
