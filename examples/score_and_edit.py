"""memcirc's Python API on a model loaded with transformers: score texts for verbatim memorization,
read what was memorized, bypass one block's attention and re-score, apply a saved K-FAC edit and
re-score.

    python examples/score_and_edit.py                                  # the testbed, no K-FAC step
    python examples/score_and_edit.py --kfac runs/testbed              # + the edit a pipeline run saved
    python examples/score_and_edit.py --model EleutherAI/pythia-160m --texts my.jsonl --prefix-len 50 --suffix-len 50

The defaults (the embedded testbed model and its canary documents) run on a CPU in seconds. A run
folder for --kfac comes from `memcirc kfac_edit --config configs/testbed.yaml --output-dir runs/testbed`
(or `make pipeline`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import memcirc
from memcirc.testbed import EVAL_DOCUMENTS, MODEL_DIR


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MODEL_DIR), help="HF model folder or Hub id (default: the testbed)")
    parser.add_argument("--texts", default=str(EVAL_DOCUMENTS),
                        help="JSONL file with a 'text' column (default: the testbed's canaries and corpus)")
    parser.add_argument("--limit", type=int, default=112, help="texts read from --texts (default: 112 canaries)")
    parser.add_argument("--prefix-len", type=int, default=32)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--block", type=int, default=1, help="block whose attention is bypassed (default: 1)")
    parser.add_argument("--kfac", help="a kfac_edit run folder (<run> or <run>/kfac) whose saved edit to apply")
    parser.add_argument("--show", type=int, default=3, help="memorized continuations printed (default: 3)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()

    # 1. Any causal LM and its tokenizer, loaded the usual way.
    model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    records = [json.loads(line) for line in Path(args.texts).read_text().splitlines()[:args.limit]]
    texts = [r["text"] for r in records]
    ids = [str(r.get("doc", i)) for i, r in enumerate(records)]   # the rows' `doc` column

    # 2. Score: one row per text, the columns of memorization/scores.jsonl plus the decoded text.
    #    `exact` = greedy decoding reproduces the whole suffix; `lcp` = how many tokens it reproduces.
    def score() -> list[dict]:
        return memcirc.score_texts(model, tokenizer, texts, args.prefix_len, args.suffix_len,
                                   metrics=["exact", "token_match"], batch_size=64, ids=ids)

    rows = score()
    memorized = [i for i, r in enumerate(rows) if r["exact"]]
    print(f"model {args.model}: {len(memorized)} of {len(rows)} texts memorized "
          f"({args.prefix_len}-token prompt, {args.suffix_len}-token greedy continuation)")

    # 3. What was memorized: the prompt and the continuation the model produces (= the true suffix).
    for i in memorized[:args.show]:
        print(f"  text {rows[i]['doc']}: {rows[i]['prefix_text'][-60:]!r}\n"
              f"      -> {rows[i]['continuation_text'][:60]!r}")
    almost = max((r for r in rows if not r["exact"]), key=lambda r: r["lcp"], default=None)
    if almost is not None:   # the closest miss: where greedy decoding leaves the true suffix
        print(f"  closest miss, text {almost['doc']} ({almost['lcp']} of {args.suffix_len} tokens): "
              f"{almost['continuation_text'][:60]!r}\n      truth: {almost['suffix_text'][:60]!r}")

    def still(new_rows: list[dict]) -> str:
        kept = sum(new_rows[i]["exact"] for i in memorized)
        mean = sum(r["token_match"] for r in new_rows) / len(new_rows)
        return f"{kept} of {len(memorized)} memorized texts still exact, mean token_match {mean:.3f}"

    # 4. Bypass one block's attention (each token attends only to itself) and score again.
    with memcirc.bypass_attention(model, layers=[args.block], mode="self"):
        print(f"attention of block {args.block} bypassed: {still(score())}")
    print(f"bypass removed again: {still(score())}")

    # 5. Apply the K-FAC edit a kfac_edit run saved; the original weights come back on exit.
    if args.kfac is None:
        print("K-FAC: pass --kfac <run folder> to apply a saved edit (make one with memcirc kfac_edit)")
        return
    with memcirc.kfac_edit(model, args.kfac) as edit:
        print(f"K-FAC edit ({edit.formula}, rho={edit.rho}, {len(edit.params)} weight matrices "
              f"from {edit.source}): {still(score())}")
    print(f"edit undone: {still(score())}")


if __name__ == "__main__":
    main()
