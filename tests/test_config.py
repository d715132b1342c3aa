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

    from memcirc import config
    from memcirc.stages.registry import STAGES

    having = [s for s in STAGES.values() if issubclass(s.config, getattr(config, group))]
    assert len(having) >= 2
    for stage in having:
        with pytest.raises(InputError, match=message):
            build_config(stage.config, argv)
        fields = {f.name for f in dataclasses.fields(getattr(config, group))}
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
