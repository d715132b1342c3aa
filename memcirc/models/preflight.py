"""Checks on the model that need only its config.json (or a GGUF's metadata): before any weights load.

A family memcirc does not support, or one TransformerLens cannot convert (gemma3 in TL 2.18), is
known from the config alone. The stages that need TransformerLens call `check_model(spec,
needs_tl=True)` first thing; `memcirc.preflight` runs it for every stage of a pipeline before the
first one starts (run_pipeline.sh). By hand:

    python -m memcirc.models.preflight --model FOLDER [--gguf-file F.gguf] [--revision R] [--needs-tl]

Exit 0 when the model passes, 2 with one line when it does not. A GGUF is not converted here.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

from memcirc.errors import InputError, exit_code
from memcirc.models.arch import ArchSpec, arch_for, require_tl
from memcirc.models.loading import ModelSpec, load_config


def check_model(spec: ModelSpec, needs_tl: bool = False, what: str = "") -> ArchSpec:
    """The model's ArchSpec, from its config alone; InputError for an unsupported family, or one
    TransformerLens cannot convert when `needs_tl`.

    Args:
        spec: the model (a GGUF not converted yet is read from its metadata, not converted).
        needs_tl: the caller converts the model to a HookedTransformer.
        what: who needs it (e.g. "find_circuits"), named in the error.
    """
    arch = arch_for(load_config(spec))
    if needs_tl:
        try:
            require_tl(arch)
        except InputError as err:
            prefix = f"{what} needs TransformerLens: " if what else ""
            raise InputError(f"{prefix}{err} (model {spec.name_or_path})") from None
    return arch


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (not argparse's usage block)
        raise InputError(f"{message} (see --help)")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="python -m memcirc.models.preflight", allow_abbrev=False,
                     description="Check a model's family (and TransformerLens support) from its config alone.")
    parser.add_argument("--model", required=True, help="local folder, Hub id or 'testbed'")
    parser.add_argument("--revision", help="Hub revision")
    parser.add_argument("--gguf-file", "--gguf_file", dest="gguf_file", help="GGUF file inside --model")
    parser.add_argument("--needs-tl", action="store_true", help="refuse a family TransformerLens cannot convert")
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)

    def work() -> None:
        args = parser.parse_args(argv)
        spec = ModelSpec(args.model, revision=args.revision, gguf_file=args.gguf_file, device="cpu")
        check_model(spec, needs_tl=args.needs_tl)

    return exit_code(work)


if __name__ == "__main__":
    sys.exit(main())
