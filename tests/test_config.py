from pathlib import Path

import pytest

from granite_ray.config import ConfigError, PretrainMLMConfig, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_yaml_with_cli_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: small\ntrain:\n  lr: 1.0e-3\n  max_steps: 10\ndata:\n  paths: [a, b]\n")
    config = load_config(PretrainMLMConfig, path, ["train.lr=2e-4", "data.text_fields=[title, text]", "model.global_rope_theta=160000"])
    assert config.train.lr == pytest.approx(2e-4)
    assert config.train.max_steps == 10
    # Relative local paths are made absolute where the config is loaded (Ray workers run elsewhere).
    assert config.data.paths == [str(Path("a").resolve()), str(Path("b").resolve())]
    assert config.data.text_fields == ["title", "text"]
    assert config.model.global_rope_theta == 160000


def test_presets_match_the_paper_and_fields_override_them():
    base = load_config(PretrainMLMConfig, None, ["model.preset=base"]).model.size()
    assert base == dict(num_hidden_layers=22, hidden_size=768, intermediate_size=1152, num_attention_heads=12)
    small = load_config(PretrainMLMConfig, None, ["model.preset=small"]).model.size()
    assert small == dict(num_hidden_layers=12, hidden_size=384, intermediate_size=1536, num_attention_heads=12)
    tiny = load_config(PretrainMLMConfig, None, ["model.preset=tiny", "model.num_hidden_layers=6"]).model.size()
    assert tiny["num_hidden_layers"] == 6
    assert tiny["hidden_size"] // tiny["num_attention_heads"] >= 32  # vLLM/sdpa-friendly head size


@pytest.mark.parametrize("override, field", [
    ("train.lr=-1", "train.lr"),
    ("train.lrr=0.1", "train.lrr"),
    ("model.preset=huge", "model.preset"),
    ("data.mlm_probability=1.5", "data.mlm_probability"),
    ("train.max_steps=ten", "train.max_steps"),
    ("train.warmup_fraction=0.95", "train"),
    ("model.hidden_size=65", "model.hidden_size"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainMLMConfig, None, [override])
    assert field in str(err.value)


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(PretrainMLMConfig, None, ["train.lr"])
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(PretrainMLMConfig, path)


def test_dumped_config_loads_back_identically():
    config = load_config(PretrainMLMConfig, REPO / "configs" / "pretrain_mlm_base.yaml")
    again = PretrainMLMConfig.model_validate(__import__("yaml").safe_load(dump_config(config)))
    assert again == config


def test_cli_reports_config_errors(capsys):
    from granite_ray.cli import main

    assert main(["pretrain-mlm", "train.batch_size=0"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


@pytest.mark.parametrize("problem, expected", [
    ("missing", "no such config file"),
    ("syntax", "not valid YAML"),
    ("model", "no such artifact"),
])
def test_every_mistake_a_user_makes_ends_in_one_line_and_exit_2(tmp_path, capsys, problem, expected):
    """A missing --config file, a YAML syntax error and a missing model folder: one line, no traceback."""
    from granite_ray.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"query": "q", "pos": ["p"]}\n')
    argv = {"missing": ["contrastive", "--config", str(tmp_path / "nope.yaml")],
            "syntax": ["contrastive", "--config", str(bad)],
            "model": ["contrastive", f"model.init_from={tmp_path / 'no-model'}", f"data.datasets=[{rows}]",
                      f"output_uri={tmp_path / 'out'}"]}[problem]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_validates_for_its_stage(path):
    import yaml

    from granite_ray.stages.registry import STAGES

    stage = yaml.safe_load(path.read_text()).get("stage", "pretrain-mlm")  # the default stage of its config class
    config = load_config(STAGES[stage].config_cls, path)
    assert config.stage == stage
