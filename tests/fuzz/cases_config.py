"""YAML, flags and values: the review's c01-c12, g01-g02, and our own (x-...)."""

from __future__ import annotations

from fuzz.build import write
from fuzz.table import COMPLETE, Case, Ctx

CONFIG_CLI = "config-cli"
STAGE_NAMES = ("memorization_score", "contrastive_dataset", "find_circuits", "verify_circuit",
               "attention_bypass", "kfac_edit", "training_dynamics", "predict_memorization")


def yaml_file(text: str | bytes, name: str = "c.yaml"):
    """A builder writing `text` to tmp/<name> (the case passes `--config {tmp}/<name>`)."""
    def build(ctx: Ctx) -> None:
        write(ctx.tmp / name, text)
    return build


def yaml_case(id: str, review: str, text: str | bytes, words: tuple[str, ...], rc: int = 2,
              stage: str = "memorization_score", extra: tuple[str, ...] = (), **kw) -> Case:
    # downstream stages: a config error comes before the upstream folder is read (none is given)
    fast = kw.pop("fast", stage == "memorization_score")
    upstream = () if stage == "memorization_score" else ("--input-dir", "{tmp}/no-upstream")
    return Case(id, review, stage, ("--config", "{tmp}/c.yaml", *upstream, *extra), rc=rc, words=words,
                build=yaml_file(text), owner=kw.pop("owner", CONFIG_CLI), fast=fast, **kw)


def flag_case(id: str, review: str, argv: tuple[str, ...], words: tuple[str, ...],
              stage: str = "memorization_score", **kw) -> Case:
    """A bad flag value: refused when the config is built, before any upstream folder is read."""
    fast = stage == "memorization_score"
    upstream = () if fast else ("--input-dir", "{tmp}/no-upstream")
    return Case(id, review, stage, (*upstream, *argv), words=words, owner=kw.pop("owner", CONFIG_CLI),
                fast=fast, **kw)


def _no_cuda(ctx: Ctx) -> None:
    import torch

    # g01 is "no GPU": on a machine with one, pretend there is none, so the case means the same
    ctx.monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ctx.monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _env(**values: str):
    def build(ctx: Ctx) -> None:
        for k, v in values.items():
            ctx.monkeypatch.setenv(k, v)
    return build


def _laughs(depth: int = 6, width: int = 10) -> str:
    """A bounded "billion laughs": `metrics` aliases width**depth strings (10**6 here; the real one,
    10**9, would hang a message that prints the value whole)."""
    def level(i: int) -> str:
        if i == 0:
            return f"&l0 [{', '.join(['lol'] * width)}]"
        return f"&l{i} [{level(i - 1)}, {', '.join([f'*l{i - 1}'] * (width - 1))}]"
    return f"memorization:\n  metrics: {level(depth - 1)}\n"


CASES = [
    # -- the review's YAML and flag cases ------------------------------------------------------
    yaml_case("c01", "H (lists every known key on one very long line; no 'did you mean')", "prefix_lenn: 32\n",
              ("prefix_lenn", "did you mean", "prefix_len"), max_chars=400),
    yaml_case("c02", "H", "- 1\n- 2\n", ("mapping",)),
    yaml_case("c03", "H", 'prefix_len: "32"\n', ("prefix_len", "int")),
    yaml_case("c04", "H", "memorization: [1, 2]\n", ("memorization", "mapping")),
    yaml_case("c05", "H", "prefix_len: [32\n", ("yaml",)),
    yaml_case("c06", "H (safe_load; no marker)", '!!python/object/apply:os.system ["touch {marker}"]\n', ("yaml",)),
    flag_case("c07", "H", ("--prefix-lne", "5"), ("--prefix-lne",)),
    flag_case("c08", "H", ("--prefix-len", "0"), ("prefix",)),
    flag_case("c09", "H", ("--prefix-len", "-5"), ("prefix", "-5")),
    flag_case("c10", "H (says every document is shorter than a window; does not mention n_ctx)",
              ("--prefix-len", "5000"), ("window",), owner="inputs"),
    flag_case("c11", "H", ("--suff", "8"), ("--suff",)),
    flag_case("c11b", "B (minor): --lim taken as --limit (argparse allow_abbrev)", ("--lim", "7"), ("--lim",)),
    yaml_case("c12", "B (minor): the last duplicate key wins silently", "prefix_len: 32\nprefix_len: 16\n",
              ("prefix_len", "duplicate")),
    Case("g01", "H", "memorization_score", ("--device", "cuda"), words=("cuda",), build=_no_cuda, owner="models"),
    flag_case("g02", "H", ("--device", "gpu"), ("gpu",), owner="models"),

    # -- our own: YAML ---------------------------------------------------------------------------
    yaml_case("x-yaml-empty", "new: an empty YAML file", "", ("would write",), rc=0, extra=("--dry-run",),
              reason="an empty YAML document is an empty mapping (every key at its default), as PyYAML reads "
                     "it; refusing it would also refuse a config holding only comments"),
    yaml_case("x-yaml-1e3", "new: `prefix_len: 1e3`", "prefix_len: 1e3\n", ("prefix_len", "1e3"),
              reason="YAML 1.1 reads 1e3 (no dot) as a string, so it is refused as not an int, naming the value"),
    yaml_case("x-yaml-bigint", "new: `prefix_len: 10**23`", "prefix_len: 99999999999999999999999\n",
              ("prefix",)),
    yaml_case("x-yaml-bom", "new: YAML starting with a UTF-8 BOM", "\ufeffprefix_len: 7\n", ("prefix_len: 7",),
              rc=0, extra=("--dry-run",), reason="a BOM is what Windows editors write; PyYAML skips it"),
    yaml_case("x-yaml-latin1", "new: YAML with a latin-1 byte in a comment", b"# caf\xe9\nprefix_len: 7\n",
              ("c.yaml", "utf-8")),
    yaml_case("x-yaml-tab", "new: tab indentation", "memorization:\n\tprefix_len: 3\n", ("yaml",)),
    yaml_case("x-yaml-long-comment", "new: a 1 MB comment line", "# " + "x" * 1_000_000 + "\nprefix_len: 7\n",
              ("prefix_len: 7",), rc=0, extra=("--dry-run",)),
    yaml_case("x-yaml-long-key", "new: an unknown key of 1,000 characters (YAML allows 1,024)", "k" * 1000 + ": 1\n",
              ("unknown config key",)),
    yaml_case("x-yaml-laughs", "new: a YAML alias bomb under metrics (10**6 aliased strings)", _laughs(),
              ("metrics",), max_chars=2000, fast=False, extra=("--dry-run",),
              reason="bounded at 10**6 leaves so a failing build cannot hang the suite; the message must not "
                     "print the expanded value"),
    yaml_case("x-yaml-section-typo", "new: unknown key inside a stage section", "memorization:\n  prefix_lenn: 3\n",
              ("prefix_lenn", "did you mean")),
    yaml_case("x-yaml-nan-threshold", "new: `threshold: .nan`", "threshold: .nan\n", ("threshold",),
              stage="contrastive_dataset"),
    yaml_case("x-yaml-inf-damping", "new: `damping: .inf`", "damping: .inf\n", ("damping",), stage="kfac_edit"),
    yaml_case("x-yaml-list-limit", "new: `limit: [1]`", "limit: [1]\n", ("limit",), fast=False, extra=("--dry-run",),
              reason="--dry-run: the FAST flags would override the YAML value under test; values are checked "
                     "when the config is built, dry run or not"),
    flag_case("x-config-dir", "new: a directory as --config", ("--config", "{tmp}"), ("config",)),

    # -- our own: flags and values -------------------------------------------------------------------
    flag_case("x-limit-0", "new: --limit 0", ("--limit", "0"), ("limit",)),
    flag_case("x-limit-neg", "new: --limit -3", ("--limit", "-3"), ("limit",)),
    flag_case("x-num-shards-0", "new: --num-shards 0", ("--num-shards", "0"), ("shards",)),
    flag_case("x-shard-index-5", "new: --shard-index 5 --num-shards 2", ("--shard-index", "5", "--num-shards", "2"),
              ("shard", "5"), owner="lifecycle"),
    flag_case("x-chunk-size-0", "new: --chunk-size 0", ("--chunk-size", "0"), ("chunk",)),
    flag_case("x-batch-size-0", "new: --batch-size 0", ("--batch-size", "0"), ("batch",)),
    flag_case("x-stride-0", "new: --windowing sliding --stride 0", ("--windowing", "sliding", "--stride", "0"),
              ("stride",)),
    flag_case("x-seed-huge", "new: --seed 10**20 (torch cannot take it)", ("--seed", "99999999999999999999"),
              ("seed",)),
    flag_case("x-prefix-1e3", "new: --prefix-len 1e3", ("--prefix-len", "1e3"), ("1e3",)),
    flag_case("x-prefix-empty", "new: --prefix-len ''", ("--prefix-len", ""), ("prefix",)),
    flag_case("x-metrics-bogus", "new: --metrics bogus", ("--metrics", "bogus"), ("bogus",)),
    flag_case("x-lev-2", "new: --levenshtein-threshold 2", ("--levenshtein-threshold", "2"), ("levenshtein",)),
    flag_case("x-lev-nan", "new: --levenshtein-threshold nan", ("--levenshtein-threshold", "nan"),
              ("levenshtein",)),
    flag_case("x-threshold-nan", "new: --threshold nan", ("--threshold", "nan"), ("threshold",),
              stage="contrastive_dataset"),
    flag_case("x-threshold-inf", "new: --threshold inf", ("--threshold", "inf"), ("threshold",),
              stage="contrastive_dataset"),
    flag_case("x-heldout-fraction", "new: --heldout-fraction 1.5", ("--heldout-fraction", "1.5"), ("heldout",),
              stage="contrastive_dataset"),
    flag_case("x-drop-nan", "new: --drop nan", ("--drop", "nan"), ("drop",), stage="contrastive_dataset"),
    flag_case("x-damping-neg", "new: --damping -1", ("--damping", "-1"), ("damping",), stage="kfac_edit"),
    flag_case("x-damping-inf", "new: --damping inf", ("--damping", "inf"), ("damping",), stage="kfac_edit"),
    flag_case("x-factor-tokens-0", "new: --factor-tokens 0", ("--factor-tokens", "0"), ("factor",),
              stage="kfac_edit"),
    flag_case("x-target-nan", "new: --target nan", ("--target", "nan"), ("target",), stage="find_circuits"),
    flag_case("x-curve-points-1", "new: --curve-points 1", ("--curve-points", "1"), ("curve",),
              stage="find_circuits"),
    flag_case("x-random-circuits-0", "new: --random-circuits 0", ("--random-circuits", "0"), ("random",),
              stage="verify_circuit"),
    flag_case("x-ppl-block-len-1", "new: --ppl-block-len 1", ("--ppl-block-len", "1"), ("ppl",),
              stage="attention_bypass"),
    flag_case("x-bypass-mode", "new: --mode foo", ("--mode", "foo"), ("foo",), stage="attention_bypass"),
    flag_case("x-folds-1", "new: --folds 1", ("--folds", "1"), ("folds",), stage="predict_memorization"),
    Case("x-slurm-env", "new: SLURM_ARRAY_TASK_COUNT=abc in the environment", "memorization_score",
         words=("SLURM_ARRAY_TASK_COUNT",), build=_env(SLURM_ARRAY_TASK_COUNT="abc", SLURM_ARRAY_TASK_ID="0"),
         owner="lifecycle"),
    Case("x-env-log-level", "new: MEMCIRC_LOG_LEVEL=LOUD in the environment", "memorization_score",
         words=("MEMCIRC_LOG_LEVEL",), build=_env(MEMCIRC_LOG_LEVEL="LOUD"), owner=CONFIG_CLI),
    *[Case(f"x-help-{name}", "new: --help", name, ("--help",), rc=0, words=("usage:",), prefix=False,
           owner=CONFIG_CLI) for name in STAGE_NAMES],
]
assert all(c.state != COMPLETE for c in CASES)   # config cases never run a stage to its end
