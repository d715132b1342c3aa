"""Every stage's --help, the `memcirc` command, and what runs before a stage's heavy imports."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from memcirc import __main__ as memcirc_command
from memcirc import __version__
from memcirc.cli import main
from memcirc.config import ALIASES, COMMON, SHARDING
from memcirc.stages.registry import STAGES

HEAVY = ("torch", "transformers", "transformer_lens", "auto_circuit", "numpy", "matplotlib")


def help_of(capsys: pytest.CaptureFixture[str], stage: str, prog: str | None = None) -> str:
    with pytest.raises(SystemExit) as done:
        main(stage, ["--help"], prog=prog)
    assert done.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict[str, str]:
    """Each listed flag -> its help, whitespace collapsed (argparse wraps help over lines)."""
    entries: dict[str, str] = {}
    for block in re.split(r"\n(?=  -)", text.split("\n\n", 2)[2]):
        head, _, rest = block.strip().partition("  ")
        entries[head.split(",")[0].split()[0]] = " ".join(rest.split())
    return entries


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_help(stage, capsys):
    text = help_of(capsys, stage)
    cls = STAGES[stage].config
    fields = dataclasses.fields(cls)
    for section in (COMMON, f"{stage} options", ALIASES):
        assert f"\n{section}:\n" in text, section
    assert (f"\n{SHARDING}:\n" in text) == (STAGES[stage].array is not None)
    for f in fields:   # every choice, as argparse shows a choice list
        if f.metadata["choices"]:
            assert "{" + ",".join(map(str, f.metadata["choices"])) + "}" in text, f.name
    entries = option_entries(text)
    for f in fields:   # one default text: a help that states its default gets no second one
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in entries, flag
        assert len(re.findall(r"\bdefault\b", entries[flag])) <= 1, entries[flag]
    assert "(default: None)" not in text
    # each flag is listed once, by its kebab-case name; the other spellings only in the aliases section
    listed = text.split(f"\n{ALIASES}:\n")[0]
    assert not re.search(r"^\s+--[\w-]+, --\w+_\w+", listed, re.M)
    assert "--merge_only" not in text or text.count("--merge_only") == 1
    # the examples print as written: every line of the help text's source, a backslash continuation too
    written = Path(str(STAGES[stage].config_module.__file__)).read_text().split('"""')[1]
    for line in written.strip().splitlines():
        assert line in text.splitlines() or not line.strip(), line


def test_help_examples_use_the_command_typed(capsys):
    text = help_of(capsys, "memorization_score", prog="memcirc score")
    assert text.startswith("usage: memcirc score ")
    assert "  memcirc score --model EleutherAI/pythia-160m --dataset timaeus/pile-wikipedia_en \\\n" in text
    assert "python memorization_score.py" not in text
    assert "--merge --num-shards" not in text   # a merge reads the shard count from the shards


def test_version_everywhere(capsys):
    for stage in STAGES:
        with pytest.raises(SystemExit) as done:
            main(stage, ["--version"])
        assert done.value.code == 0 and capsys.readouterr().out == f"memcirc {__version__}\n"
    assert memcirc_command.main(["--version"]) == 0
    assert capsys.readouterr().out == f"memcirc {__version__}\n"


def test_memcirc_command_lists_and_dispatches(tmp_path, capsys):
    assert memcirc_command.main(["--help"]) == 0
    listing = capsys.readouterr().out
    for stage in STAGES.values():
        assert re.search(rf"^  {stage.command_name} +\S", listing, re.M), stage.command_name
    assert re.search(r"^  report +\S", listing, re.M) and re.search(r"^  slurm +\S", listing, re.M)
    assert memcirc_command.main([]) == 2 and "usage: memcirc" in capsys.readouterr().err
    assert memcirc_command.main(["scroe"]) == 2
    assert capsys.readouterr().err == "error: unknown command 'scroe' (did you mean 'score'?) (see memcirc --help)\n"
    argv = ["--output-dir", str(tmp_path), "--dry-run", "--prefix-len", "7"]
    outputs = []
    for command in ("score", "memorization_score"):   # short name and stage name, the same run
        assert memcirc_command.main([command, *argv]) == 0
        outputs.append(capsys.readouterr().out)
    assert main("memorization_score", argv) == 0
    assert outputs == [capsys.readouterr().out] * 2 and "prefix_len: 7" in outputs[0]
    assert memcirc_command.main(["report", str(tmp_path / "nothing")]) == 2   # memcirc.report's main
    assert capsys.readouterr().err.startswith("error: ")


def test_predecessor_bool_alias_still_parses():
    from memcirc.config import build_config

    cfg = STAGES["memorization_score"].config
    assert build_config(cfg, ["--merge_only"]).to_dict()["merge"] is True
    assert build_config(cfg, ["--merge", "--no-merge_only"]).to_dict()["merge"] is False


def test_circuit_stages_without_auto_circuit_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "auto_circuit" else real(name, *a))
    for stage in ("find_circuits", "verify_circuit", "training_dynamics"):
        assert main(stage, ["--output-dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.endswith("pip install --no-deps auto-circuit==1.0.1\n"), err
    assert not any(tmp_path.iterdir())
    assert main("training_dynamics", ["--output-dir", str(tmp_path), "--no-circuits"]) == 2   # gets further
    assert "auto-circuit" not in capsys.readouterr().err


PROBE = """
import json, runpy, sys
runs, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
codes = []
for argv in runs:
    sys.argv = argv
    try:
        if argv[0] == "memcirc":
            runpy.run_module("memcirc", run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        codes.append(e.code)
print(json.dumps({"codes": codes, "heavy": [m for m in heavy if m in sys.modules]}))
"""


def test_help_imports_no_heavy_library():
    """--help of every stage (root script and `memcirc <command>`) prints before torch & co. are imported."""
    runs = [[str(REPO / s.script), "--help"] for s in STAGES.values()]
    runs += [["memcirc", s.command_name, "--help"] for s in STAGES.values()] + [["memcirc", "--help"]]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(runs), json.dumps(HEAVY)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {"codes": [0] * len(runs), "heavy": []}
