"""Each stage's `Config`, one module per stage, importable without torch, transformers or
TransformerLens: a stage's `--help`, its YAML checks and `--dry-run` need no heavy import. The
module's docstring is the stage's help text; the stage module (`memcirc.stages.<stage>`) imports
its Config from here."""
