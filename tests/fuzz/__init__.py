"""The fuzz table of issue 12: hostile inputs and faults, each with the behaviour memcirc promises.

`table.CASES` is every case: the reliability review's 117 (ids c01 ... rr) and our own (ids x..).
A case names its input builder, its command (a stage and its argv), the exit code, the words of the
one stderr line and the state the stage folder must be left in. `tests/test_fuzz.py` runs them:
in-process through `memcirc.cli.main` where possible, as real processes for locks, kills and
`run_pipeline.sh`. Modules: `build` (files), `cases_*` (the table, by area), `runner` (checks),
`process` (the real-process cases).
"""
