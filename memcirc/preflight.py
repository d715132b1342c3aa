"""`python -m memcirc.preflight --stages STAGE... [flags]`: check the model of every stage of a run first.

run_pipeline.sh calls this before its first stage with the stages it will run and their common
flags. Each stage's config is resolved as the stage resolves it (defaults < YAML < flags), and its
model is checked from config.json (or the GGUF's metadata) alone by
`memcirc.models.preflight.check_model`: an unsupported family, a missing model or GGUF file, and a
family TransformerLens cannot convert (for the stages that convert) exit 2 with one line before any
stage has run. Nothing is loaded or converted.
"""

from __future__ import annotations

import argparse
import sys

from memcirc.config import build_config
from memcirc.errors import InputError, exit_code
from memcirc.models.preflight import check_model
from memcirc.stages.registry import STAGES


def check_stages(stages: list[str], argv: list[str]) -> None:
    """`check_model` for the model of each stage in `stages`, its config built from `argv`."""
    for name in stages:
        if name not in STAGES:
            raise InputError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        cfg = build_config(STAGES[name].config, argv)
        check_model(cfg.model_spec(), needs_tl=STAGES[name].needs_tl(cfg), what=name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memcirc.preflight", allow_abbrev=False,
                                     description="Check the model of each stage before the first one runs.")
    parser.add_argument("--stages", nargs="+", required=True, metavar="STAGE")
    own, rest = parser.parse_known_args(argv)
    return exit_code(lambda: check_stages(own.stages, rest))


if __name__ == "__main__":
    sys.exit(main())
