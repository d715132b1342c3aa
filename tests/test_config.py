import pytest

from memcirc.config import build_config, load_yaml
from memcirc.errors import InputError
from memcirc.stages.memorization_score import ScoreConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_yaml_cli_precedence(tmp_path):
    cfg_file = write(tmp_path, "prefix_len: 32\nsuffix_len: 16\nmemorization:\n  batch_size: 7\n")
    cfg = build_config(ScoreConfig, ["--config", cfg_file, "--suffix-len", "20"])
    assert (cfg.prefix_len, cfg.suffix_len, cfg.batch_size) == (32, 20, 7)
    assert cfg.windowing == "start"  # dataclass default


def test_stage_section_overrides_top_level(tmp_path):
    cfg_file = write(tmp_path, "batch_size: 3\nmemorization:\n  batch_size: 5\n")
    assert build_config(ScoreConfig, ["--config", cfg_file]).batch_size == 5


def test_predecessor_aliases_and_snake_case():
    cfg = build_config(ScoreConfig, ["--model_name", "m", "--prompt_tokens", "10",
                                     "--generation_tokens", "11", "--batch_size", "4", "--output_dir", "o"])
    assert (cfg.model, cfg.prefix_len, cfg.suffix_len, cfg.batch_size, cfg.output_dir) == ("m", 10, 11, 4, "o")


def test_cli_false_overrides_yaml_true(tmp_path):
    cfg_file = write(tmp_path, "streaming: true\n")
    assert build_config(ScoreConfig, ["--config", cfg_file]).streaming is True
    assert build_config(ScoreConfig, ["--config", cfg_file, "--no-streaming"]).streaming is False


@pytest.mark.parametrize("text, key", [("prefix_lenn: 3\n", "prefix_lenn"),
                                       ("memorization:\n  bogus: 1\n", "memorization.bogus")])
def test_unknown_key_is_named(tmp_path, text, key):
    with pytest.raises(InputError, match=f"unknown config key '{key}'"):
        build_config(ScoreConfig, ["--config", write(tmp_path, text)])


@pytest.mark.parametrize("argv, key", [(["--dtype", "float64"], "dtype"),
                                       (["--prefix-len", "0"], "prefix_len"),
                                       (["--metrics", "exact", "perplexity"], "metrics")])
def test_bad_values_name_the_key(argv, key):
    with pytest.raises(InputError, match=f"'{key}'"):
        build_config(ScoreConfig, argv)


def test_yaml_type_error_names_key(tmp_path):
    with pytest.raises(InputError, match="'prefix_len' must be int"):
        build_config(ScoreConfig, ["--config", write(tmp_path, "prefix_len: ten\n")])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_yaml(str(tmp_path / "nope.yaml"))
    with pytest.raises(InputError, match="mapping"):
        load_yaml(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(InputError, match="not valid YAML"):
        load_yaml(write(tmp_path, "a: [1,\n"))


def test_unknown_flag_is_input_error():
    with pytest.raises(InputError, match="unrecognized arguments"):
        build_config(ScoreConfig, ["--no-such-flag", "1"])


def test_hash_ignores_run_control():
    a = build_config(ScoreConfig, ["--batch-size", "4", "--output-dir", "x"])
    b = build_config(ScoreConfig, ["--batch-size", "9", "--output-dir", "y", "--force"])
    c = build_config(ScoreConfig, ["--prefix-len", "9"])
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_testbed_yaml_is_valid():
    from conftest import REPO

    cfg = build_config(ScoreConfig, ["--config", str(REPO / "configs" / "testbed.yaml")])
    assert cfg.model == "testbed" and cfg.prefix_len + cfg.suffix_len <= 128


def test_pipeline_stage_list(tmp_path):
    from memcirc.config import pipeline_stages
    from memcirc.stages.registry import DEFAULT_PIPELINE

    assert pipeline_stages(write(tmp_path, "model: testbed\n")) == list(DEFAULT_PIPELINE)
    listed = write(tmp_path, "pipeline: [kfac_edit, memorization_score]\nprefix_len: 8\n")
    assert pipeline_stages(listed) == ["memorization_score", "kfac_edit"]  # pipeline order
    assert build_config(ScoreConfig, ["--config", listed]).prefix_len == 8  # stages ignore the key
    with pytest.raises(InputError, match="'pipeline'"):
        pipeline_stages(write(tmp_path, "pipeline: [nope]\n"))


# -- every registered stage ------------------------------------------------------------------------

def test_every_registered_config_builds_from_the_testbed_yaml():
    from conftest import REPO

    from memcirc.stages.registry import STAGES

    for stage in STAGES.values():
        cfg = build_config(stage.config, ["--config", str(REPO / "configs" / "testbed.yaml")])
        assert cfg.stage == stage.name and cfg.stage_dir.name == stage.folder
        assert cfg.model == "testbed" and cfg.seed == 0
        if stage.needs:   # --input-dir defaults to the first stage it reads
            assert cfg.upstream_dir == cfg.stage_folder(stage.needs[0])


@pytest.mark.parametrize("group, argv, message", [
    ("CircuitOptions", ["--target", "1.5"], "'target'"),
    ("CircuitOptions", ["--ablation", "nope"], "'ablation'"),
    ("MemorizedRule", ["--memorized-by", "nope"], "'memorized_by'"),
    ("HeldoutEval", ["--ppl-blocks", "0"], "'ppl_blocks'"),
    ("Sharding", ["--shard-index", "-1"], "'shard_index'"),
])
def test_a_shared_option_is_validated_alike_in_every_stage_that_has_it(group, argv, message):
    """One declaration, one check, at config time: e.g. --target 1.5 is refused by find_circuits and
    training_dynamics alike (and so by a SLURM pre-flight, which builds every config)."""
    import dataclasses

    from memcirc import option_groups
    from memcirc.stages.registry import STAGES

    having = [s for s in STAGES.values() if issubclass(s.config, getattr(option_groups, group))]
    assert len(having) >= 2
    for stage in having:
        with pytest.raises(InputError, match=message):
            build_config(stage.config, argv)
        fields = {f.name for f in dataclasses.fields(getattr(option_groups, group))}
        assert fields <= {f.name for f in dataclasses.fields(stage.config)}


def test_dry_run_refuses_what_the_run_would_refuse(capsys):
    from memcirc.cli import main

    assert main("find_circuits", ["--target", "1.5", "--dry-run"]) == 2
    assert "'target'" in capsys.readouterr().err


def test_testbed_data_is_resolved_to_its_files_in_the_config_layer():
    from memcirc.stages.kfac_edit import KfacConfig
    from memcirc.testbed import CORPUS_DIR, EVAL_DOCUMENTS

    cfg = build_config(KfacConfig, [])
    assert cfg.data_path("heldout") == str(CORPUS_DIR / "heldout.txt")
    assert cfg.data_path("factor_data") == str(CORPUS_DIR / "train.txt")
    assert build_config(ScoreConfig, []).data_path("dataset") == str(EVAL_DOCUMENTS)
    assert build_config(ScoreConfig, ["--dataset", "org/name"]).data_path("dataset") == "org/name"
    assert cfg.heldout == "testbed"   # the config (and so the manifest and the fingerprint) keeps the name


# -- reliability hardening (issue 12): finite floats, ranges, strict flags and YAML -----------------

def _float_fields():
    import dataclasses
    import typing

    from memcirc.options import field_type
    from memcirc.stages.registry import STAGES

    for stage in STAGES.values():
        for f in dataclasses.fields(stage.config):
            tp, _ = field_type(f)
            if tp is float or (typing.get_origin(tp) is list and typing.get_args(tp) == (float,)):
                yield stage, f


def test_every_float_option_declares_its_range():
    """A float option without a range would let any finite value through; NaN is refused for all."""
    fields = list(_float_fields())
    assert {f.name for _, f in fields} >= {"damping", "levenshtein_threshold", "threshold", "rhos", "save_rho"}
    for stage, f in fields:
        assert f.metadata["within"] is not None, f"{stage.name}.{f.name} has no range (option(within=...))"


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "1e999"])
def test_non_finite_floats_are_refused_on_the_command_line(text):
    """k15: --damping nan ran the whole stage and wrote NaN into summary.json; every float flag refuses it."""
    for stage, f in _float_fields():
        flag = f"--{f.name.replace('_', '-')}"
        with pytest.raises(InputError, match=f"config key '{f.name}' must be a finite number"):
            build_config(stage.config, [f"{flag}={text}"])   # '=': argparse takes a bare -inf for a flag


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1.0e+999", "[0.5, .nan]"])
def test_non_finite_floats_are_refused_in_yaml(tmp_path, value):
    from memcirc.stages.kfac_edit import KfacConfig

    key = "rhos" if value.startswith("[") else "damping"
    with pytest.raises(InputError, match=f"config key '{key}' must be a finite number"):
        build_config(KfacConfig, ["--config", write(tmp_path, f"kfac:\n  {key}: {value}\n")])


@pytest.mark.parametrize("stage, argv, message", [
    ("kfac_edit", ["--save-rho", "-0.2"], "'save_rho' must lie in (0, 1], got -0.2"),     # k11: not 'rhos'
    ("kfac_edit", ["--rhos", "0.5", "1.5"], "'rhos' must lie in (0, 1], got 1.5"),
    ("kfac_edit", ["--damping", "-1e-3"], "'damping' must lie in [0, inf)"),
    ("memorization_score", ["--levenshtein-threshold", "1.5"], "'levenshtein_threshold' must lie in [0, 1]"),
    ("attention_bypass", ["--levenshtein-threshold", "-0.1"], "'levenshtein_threshold' must lie in [0, 1]"),
    ("contrastive_dataset", ["--threshold", "0"], "'threshold' must lie in (0, inf)"),
    ("contrastive_dataset", ["--drop", "1"], "'drop' must lie in (0, 1)"),
    ("contrastive_dataset", ["--heldout-fraction", "0"], "'heldout_fraction' must lie in (0, 1)"),
    ("find_circuits", ["--target", "0"], "'target' must lie in (0, 1]"),
])
def test_float_ranges_name_the_key_the_user_wrote(stage, argv, message):
    import re

    from memcirc.stages.registry import STAGES

    with pytest.raises(InputError, match=re.escape(message)):
        build_config(STAGES[stage].config, argv)


def test_range_ends_are_accepted():
    from memcirc.stages.kfac_edit import KfacConfig

    cfg = build_config(KfacConfig, ["--damping", "0", "--save-rho", "1", "--rhos", "1", "0.01",
                                    "--levenshtein-threshold", "1"])
    assert (cfg.damping, cfg.save_rho, cfg.rhos, cfg.levenshtein_threshold) == (0.0, 1.0, [1.0, 0.01], 1.0)


def test_flags_are_never_abbreviated():
    """c11b: `--lim 7` was taken as --limit; now it is refused, with the flag it was probably meant as."""
    from memcirc.stages.registry import STAGES

    for stage in STAGES.values():
        with pytest.raises(InputError, match=r"unrecognized arguments: --lim 7 \(did you mean --limit\?"):
            build_config(stage.config, ["--lim", "7"])
    with pytest.raises(InputError, match=r"did you mean --prefix-len\?"):   # c07, and '_' spelled '-'
        build_config(ScoreConfig, ["--prefix_lne", "3"])
    with pytest.raises(InputError, match=r"unrecognized arguments: --xyzzy 1 \(see --help\)"):
        build_config(ScoreConfig, ["--xyzzy", "1"])


def test_module_command_lines_refuse_abbreviations(tmp_path, capsys):
    from memcirc import preflight
    from memcirc.models import gguf
    from memcirc.slurm.__main__ import main as slurm_main

    assert slurm_main(["submit", "--output-dir", str(tmp_path), "--dry-r"]) == 2
    assert "unrecognized arguments: --dry-r (did you mean --dry-run?" in capsys.readouterr().err
    assert slurm_main(["status", str(tmp_path), "--pol", "1"]) == 2
    assert "unrecognized arguments: --pol 1 (did you mean --poll?" in capsys.readouterr().err
    for main, argv, words in ((gguf.main, ["convert", str(tmp_path), "x.gguf", "--o", "y"],
                               "unrecognized arguments: --o y"),
                              (preflight.main, ["--stage", "find_circuits"],   # --stage is not --stages
                               "the following arguments are required: --stages")):
        with pytest.raises(SystemExit) as exited:   # plain argparse there: its usage line and exit 2
            main(argv)
        assert exited.value.code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, line", [
    ("prefix_len: 32\nsuffix_len: 8\nprefix_len: 16\n", 3),                      # c12: the last won silently
    ("memorization:\n  batch_size: 4\n  batch_size: 8\n", 3),
    ("memorization:\n  batch_size: 4\nmemorization:\n  chunk_size: 8\n", 3),     # a section twice
])
def test_duplicate_yaml_keys_are_refused_with_file_and_line(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(InputError, match=f"{path}:{line}: duplicate key '(prefix_len|batch_size|memorization)' "
                                         r"\(first at line \d\); keep one of them"):
        build_config(ScoreConfig, ["--config", path])


def test_duplicate_keys_are_refused_in_the_pipeline_list_and_slurm_section(tmp_path):
    from memcirc.config import pipeline_stages
    from memcirc.slurm.settings import read_settings

    with pytest.raises(InputError, match=":2: duplicate key 'pipeline'"):
        pipeline_stages(write(tmp_path, "pipeline: [memorization_score]\npipeline: [kfac_edit]\n"))
    with pytest.raises(InputError, match=":3: duplicate key 'gpus'"):
        read_settings(write(tmp_path, "slurm:\n  gpus: 1\n  gpus: 2\n"))


def test_yaml_merge_keys_still_override(tmp_path):
    """`<<: *anchor` overriding a merged key is YAML's own feature, not a duplicate."""
    from memcirc.stages.attention_bypass import BypassConfig

    path = write(tmp_path, "memorization: &m\n  batch_size: 4\nbypass:\n  <<: *m\n  batch_size: 2\n")
    assert build_config(ScoreConfig, ["--config", path]).batch_size == 4
    assert build_config(BypassConfig, ["--config", path]).batch_size == 2


def test_unknown_key_suggests_the_close_one_and_never_lists_a_hundred(tmp_path):
    """c01: the message listed every known key (~100) on one line and had no "did you mean"."""
    with pytest.raises(InputError, match=r"unknown config key 'prefix_lenn' in .*c\.yaml \(did you mean "
                                         r"'prefix_len'\?\)$"):
        build_config(ScoreConfig, ["--config", write(tmp_path, "prefix_lenn: 3\n")])
    with pytest.raises(InputError, match=r"'memorization\.bach_size' .*\(did you mean 'batch_size'\?\)"):
        build_config(ScoreConfig, ["--config", write(tmp_path, "memorization:\n  bach_size: 3\n")])
    for text, hint in (("zzqqx: 1\n", "see <stage>.py --help"),
                       ("memorization:\n  zzqqx: 1\n", "the flags of memorization_score.py --help")):
        with pytest.raises(InputError) as err:
            build_config(ScoreConfig, ["--config", write(tmp_path, text)])
        assert hint in str(err.value) and len(str(err.value)) < 300 and "batch_size" not in str(err.value)


def test_unknown_slurm_key_suggests_the_close_one(tmp_path):
    from memcirc.slurm.settings import read_settings

    with pytest.raises(InputError, match=r"unknown config key 'slurm\.gpu' in .* \(did you mean 'gpus'\?\)"):
        read_settings(write(tmp_path, "slurm:\n  gpu: 1\n"))
    with pytest.raises(InputError, match=r"unknown config key 'slurm\.kfac_edit\.memm' \(did you mean 'mem'\?\)"):
        read_settings(write(tmp_path, "slurm:\n  kfac_edit: {memm: 4G}\n"))


# -- strict JSON ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_json_artifacts_refuse_nan_and_infinity(tmp_path, bad):
    """NaN is not JSON (strict parsers refuse it): reaching a writer is a bug, never a NaN in the file."""
    from memcirc import artifacts as art

    with pytest.raises(ValueError, match=r"summary\.json: Out of range float"):
        art.write_json(tmp_path / "summary.json", {"damping": bad})
    with pytest.raises(ValueError, match="Out of range float"):
        art.write_jsonl(tmp_path / "rows.jsonl", [{"x": 1.0}, {"x": bad}])
    assert list(tmp_path.iterdir()) == []   # nothing written, no temp file left
    art.write_json(tmp_path / "ok.json", {"auroc": None})   # undefined values are written as null
    assert (tmp_path / "ok.json").read_text() == '{\n  "auroc": null\n}\n'


# -- the CLI's last line ----------------------------------------------------------------------------

def _fake_stage(monkeypatch, body):
    import memcirc.stages.memorization_score as module

    monkeypatch.setattr(module, "run", body)
    from memcirc.cli import main

    return lambda *argv: main("memorization_score", ["--output-dir", "unused", *argv])


def test_bad_input_before_the_first_long_step_is_one_line(monkeypatch, capsys):
    """k06: the inputs were checked (logs released), then a resume file was found bad: 2 INFO lines
    came before the error. INFO lines are held until the first progress loop, so it is one line now."""
    import logging

    from memcirc.logs import release_logs

    def run(cfg):
        logging.getLogger("memcirc.test").info("loaded the model")
        release_logs()
        logging.getLogger("memcirc.test").info("resuming from chunks")
        raise InputError("chunks/partial.safetensors is truncated: delete it and re-run")

    assert _fake_stage(monkeypatch, run)() == 2
    assert capsys.readouterr().err == "error: chunks/partial.safetensors is truncated: delete it and re-run\n"


def test_an_error_after_a_long_step_is_the_last_line(monkeypatch, capsys, tmp_path):
    import logging

    from memcirc.logs import Meter, attach_log_file, release_logs

    def run(cfg):
        attach_log_file(tmp_path / "log.txt")
        release_logs()
        logging.getLogger("memcirc.test").info("scoring 8 windows")
        with Meter("scoring", 8, "windows") as meter:
            meter.update(4)
        logging.getLogger("memcirc.test").warning("a warning")
        raise InputError("row 5 is bad")

    assert _fake_stage(monkeypatch, run)() == 2
    err = capsys.readouterr().err.splitlines()
    assert "scoring 8 windows" in err[0] and "a warning" in err[1] and err[-1] == "error: row 5 is bad"
    assert (tmp_path / "log.txt").read_text().splitlines()[-1].endswith("ERROR memcirc: error: row 5 is bad")


def test_success_prints_the_held_lines(monkeypatch, capsys):
    import logging

    def run(cfg):
        logging.getLogger("memcirc.test").info("nothing to do")

    assert _fake_stage(monkeypatch, run)() == 0
    assert "nothing to do" in capsys.readouterr().err


@pytest.mark.parametrize("code, words", [("ENOSPC", "no space left on device while writing /x/chunks/00001.jsonl "
                                                    "(ENOSPC): free space and re-run the same command to resume"),
                                         ("EDQUOT", "disk quota exceeded while writing /x/chunks/00001.jsonl"),
                                         ("EROFS", "read-only file system while writing /x/chunks/00001.jsonl "
                                                   "(EROFS): make it writable")])
def test_disk_full_is_one_line_exit_1(monkeypatch, capsys, code, words):
    """f03: a full disk ended in a 20-line traceback. It is not bad input (exit 2 means "change the
    input"): exit 1, but one line that says what to do; re-running resumes."""
    import errno
    import os

    def run(cfg):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), "/x/chunks/00001.jsonl")

    assert _fake_stage(monkeypatch, run)() == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {words}") and len(err.splitlines()) == 1, err


def test_a_failed_write_names_its_file(tmp_path, monkeypatch):
    """write() and fsync() errors carry no file name; the atomic writer adds it (for the line above)."""
    import errno
    import os

    from memcirc import artifacts as art

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as err:
        art.atomic_write_bytes(tmp_path / "a.jsonl", b"x\n")
    assert err.value.filename == str(tmp_path / "a.jsonl") and list(tmp_path.iterdir()) == []


def test_other_os_errors_keep_their_traceback(monkeypatch):
    def run(cfg):
        raise PermissionError(13, "Permission denied", "/x")

    with pytest.raises(PermissionError):
        _fake_stage(monkeypatch, run)()


def test_module_command_lines_print_disk_full_as_one_line(capsys):
    """`python -m memcirc.models convert` writes GB-sized folders: the same line as the stages."""
    import errno

    from memcirc.errors import exit_code

    def work():
        raise OSError(errno.ENOSPC, "No space left on device", "/cache/model.safetensors")

    assert exit_code(work) == 1
    assert capsys.readouterr().err == ("error: no space left on device while writing /cache/model.safetensors "
                                       "(ENOSPC): free space and re-run the same command to resume\n")


def test_every_stage_help_formats():
    """argparse %-formats help texts: kfac_edit's "<= 20%)" made its --help a traceback."""
    from memcirc.config import build_parser
    from memcirc.stages.registry import STAGES

    for stage in STAGES.values():
        assert "--output-dir" in build_parser(stage.config).format_help()


def test_seed_fits_every_library_and_log_level_env_is_checked(monkeypatch):
    with pytest.raises(InputError, match=r"'seed' must lie in \[0, 4294967295\]"):   # sklearn: 32 bits
        build_config(ScoreConfig, ["--seed", str(2**32)])
    from memcirc.logs import setup_logging

    monkeypatch.setenv("MEMCIRC_LOG_LEVEL", "LOUD")
    with pytest.raises(InputError, match="MEMCIRC_LOG_LEVEL='LOUD' is not a logging level"):
        setup_logging("INFO")


def test_error_lines_stay_one_short_line(tmp_path, monkeypatch, capsys):
    """A value is shown cut to 80 characters (a YAML alias bomb expands to megabytes); a control
    character in a message (a path with a newline) is escaped, so `error:` stays one line."""
    path = write(tmp_path, "prefix_len: [" + ", ".join(["12345"] * 1000) + "]\n")
    with pytest.raises(InputError) as err:
        build_config(ScoreConfig, ["--config", path])
    assert "characters)" in str(err.value) and len(str(err.value)) < 250

    def run(cfg):
        raise InputError("file not found: /data/a\nb.jsonl")

    assert _fake_stage(monkeypatch, run)() == 2
    assert capsys.readouterr().err == "error: file not found: /data/a\\nb.jsonl\n"


@pytest.mark.parametrize("section, folder", [("memorization_score", "memorization"), ("attention_bypass", "bypass"),
                                             ("kfac", "kfac"), ("score", "memorization")])
def test_a_section_named_after_the_stage_suggests_its_folder(tmp_path, section, folder):
    """YAML sections are the stages' folders; a stage's name (or command) there is an error that names the folder."""
    path = write(tmp_path, f"{section}:\n  batch_size: 4\n")
    if section == folder:
        build_config(ScoreConfig, ["--config", path])   # a real section (kfac's), nothing to say
        return
    with pytest.raises(InputError, match=rf"unknown config key '{section}' in .* \(did you mean '{folder}'\?\)$"):
        build_config(ScoreConfig, ["--config", path])
