"""load_config: YAML composition, overrides, per-objective schema, one-line errors, save round trip."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from framework.config.load import config_from_dict, config_to_dict, config_to_yaml, load_config, save_config
from framework.config.schema import RunConfig
from framework.errors import ConfigError
from framework.objectives import clm, mlm

MINIMAL = "objective:\n  name: clm\ndata:\n  train: shards/\n"


def write(root: Path, rel: str, text: str) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def config_error(config_path, overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None if config_path is None else str(config_path), overrides)
    message = str(info.value)
    assert "\n" not in message, "errors are printed as one line"
    return message


# --- composition ---------------------------------------------------------------------------


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    """experiments/gpt.yaml -> [../base (-> data/tiny), ../models/small.yaml], nested and relative."""
    write(tmp_path, "configs/data/tiny.yaml", """
        data:
          train: tiny/train
          val: tiny/val
          batch_size: 4
    """)
    write(tmp_path, "configs/base.yaml", """
        defaults: [data/tiny]
        objective:
          name: clm
        data:
          batch_size: 8
        trainer:
          max_steps: 10
          devices: 2
    """)
    write(tmp_path, "configs/models/small.yaml", """
        model:
          dim: 64
        trainer:
          devices: 3
    """)
    return write(tmp_path, "configs/experiments/gpt.yaml", """
        defaults:
          - ../base
          - ../models/small.yaml
        trainer:
          max_steps: 50
        optim:
          lr: 1e-3
    """)


def test_defaults_are_composed_recursively_relative_to_each_file(experiment: Path) -> None:
    cfg = load_config(str(experiment), [])
    assert isinstance(cfg, RunConfig)
    assert cfg.data.train == "tiny/train" and cfg.data.val == "tiny/val"  # default of a default
    assert cfg.data.batch_size == 8  # base.yaml beats its own default data/tiny
    assert cfg.model.dim == 64
    assert cfg.optim.lr == pytest.approx(1e-3)


def test_later_default_wins_file_beats_defaults_command_line_beats_file(experiment: Path) -> None:
    cfg = load_config(str(experiment), [])
    assert cfg.trainer.devices == 3  # models/small comes after base in the list
    assert cfg.trainer.max_steps == 50  # the file's own keys beat its defaults
    cfg = load_config(str(experiment), ["trainer.max_steps=200", "trainer.devices=1"])
    assert cfg.trainer.max_steps == 200 and cfg.trainer.devices == 1


def test_overrides_parse_scalars_and_lists(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", MINIMAL)
    cfg = load_config(str(path), ["data.train=[a,b]", "optim.betas=[0.9,0.99]", "trainer.max_steps=200",
                                  "logging.progress=false", "optim.lr=2e-4"])
    assert cfg.data.train == ["a", "b"]
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.trainer.max_steps == 200 and cfg.logging.progress is False
    assert cfg.optim.lr == pytest.approx(2e-4)


def test_config_from_command_line_only() -> None:
    cfg = load_config(None, ["objective.name=clm", "data.train=x"])
    assert cfg.objective.name == "clm" and cfg.data.train == "x"


# --- schema selection ----------------------------------------------------------------------


def test_objective_name_selects_its_schema(tmp_path: Path) -> None:
    cfg = load_config(None, ["objective.name=mlm", "data.train=x", "objective.mask_prob=0.2"])
    assert isinstance(cfg.objective, mlm.Config) and cfg.objective.mask_prob == 0.2
    assert cfg.model.name == mlm.default_model

    cfg = load_config(None, ["objective.name=clm", "data.train=x"])
    assert isinstance(cfg.objective, clm.Config) and not hasattr(cfg.objective, "mask_prob")
    message = config_error(None, ["objective.name=clm", "data.train=x", "objective.mask_prob=0.2"])
    assert message.startswith("command line: unknown key 'objective.mask_prob'")


def test_objective_name_on_command_line_wins_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", MINIMAL)
    cfg = load_config(str(path), ["objective.name=mlm", "objective.mask_prob=0.3"])
    assert isinstance(cfg.objective, mlm.Config) and cfg.objective.mask_prob == 0.3
    assert cfg.run.dir == "runs/mlm"


# --- rejections ----------------------------------------------------------------------------


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path: Path) -> None:
    write(tmp_path, "configs/base.yaml", MINIMAL)
    path = write(tmp_path, "configs/experiments/gpt.yaml", """
        defaults: [../base]
        trainer:
          max_stpes: 5
    """)
    message = config_error(path, [])
    assert message == f"{path}: unknown key 'trainer.max_stpes' (did you mean 'trainer.max_steps'?)"


def test_unknown_key_in_a_default_names_that_default(tmp_path: Path) -> None:
    base = write(tmp_path, "base.yaml", MINIMAL + "optim:\n  lrr: 0.1\n")
    path = write(tmp_path, "run.yaml", "defaults: [base]\n")
    assert config_error(path, []) == f"{base}: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"


def test_unknown_top_level_section(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", MINIMAL)
    message = config_error(path, ["traner.max_steps=5"])
    assert message == "command line: unknown key 'traner' (did you mean 'trainer'?)"


@pytest.mark.parametrize("override, expected", [
    ("trainer.max_steps=abc", "command line: trainer.max_steps: 'abc' is not a valid int"),
    ("optim.lr=fast", "command line: optim.lr: 'fast' is not a valid float"),
    ("logging.progress=maybe", "command line: logging.progress: 'maybe' is not a valid bool"),
    ("optim.betas=[0.9,x]", "command line: optim.betas[1]: 'x' is not a valid float"),
    ("trainer=5", "command line: 'trainer' must be a mapping of keys, got 5"),
])
def test_wrong_type_on_command_line(tmp_path: Path, override: str, expected: str) -> None:
    path = write(tmp_path, "run.yaml", MINIMAL)
    assert config_error(path, [override]) == expected


def test_override_without_equals() -> None:
    assert config_error(None, ["foo"]) == "override 'foo' is not of the form key=value"


def test_missing_required_value_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "objective:\n  name: clm\n")
    message = config_error(path, [])
    assert message == f"missing required value 'data.train' (set it in {path} or on the command line: data.train=...)"


def test_missing_objective_name_lists_known_objectives(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "data:\n  train: x\n")
    message = config_error(path, [])
    assert "objective.name" in message and str(path) in message and "clm, mlm" in message


def test_unknown_objective_lists_known_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", "objective:\n  name: mlmm\ndata:\n  train: x\n")
    message = config_error(path, [])
    from framework.objectives import OBJECTIVES

    assert message == f"{path}: unknown objective 'mlmm' (did you mean 'mlm'?); known objectives: {', '.join(OBJECTIVES)}"
    assert "clm" in OBJECTIVES and "simclr" in OBJECTIVES


def test_unknown_model_suggests(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", MINIMAL)
    message = config_error(path, ["model.name=transfomer"])
    assert message.startswith("command line: unknown model 'transfomer' (did you mean 'transformer'?)")


def test_cycle_in_defaults(tmp_path: Path) -> None:
    a = write(tmp_path, "a.yaml", "defaults: [sub/b]\n")
    b = write(tmp_path, "sub/b.yaml", "defaults: [../a.yaml]\n")
    message = config_error(a, [])
    assert message.startswith("cycle in config defaults:") and str(a) in message and str(b) in message


def test_missing_file_and_missing_default(tmp_path: Path) -> None:
    assert config_error(tmp_path / "nope.yaml", []) == f"config file not found: {tmp_path / 'nope.yaml'}"
    path = write(tmp_path, "run.yaml", "defaults: [gone]\n")
    message = config_error(path, [])
    assert message.startswith(f"{path}: default 'gone' not found")


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", "objective:\n  name: clm\n data: 1\n")  # line 3 mis-indented
    assert config_error(path, []) == f"{path}: invalid YAML at line 3: did not find expected key"


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "list.yaml", "- a\n- b\n")
    assert config_error(path, []) == f"{path}: the top level must be a mapping of keys, got a list"


# --- interpolation and saving --------------------------------------------------------------


def test_run_dir_interpolation_resolves(tmp_path: Path) -> None:
    cfg = load_config(str(write(tmp_path, "run.yaml", MINIMAL)), [])
    assert cfg.run.dir == "runs/clm"


def test_bad_interpolation_names_key(tmp_path: Path) -> None:
    path = write(tmp_path, "run.yaml", MINIMAL)
    message = config_error(path, ["logging.run_name=${nope}"])
    assert message.startswith("cannot resolve interpolation in 'logging.run_name'")


def test_save_config_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["objective.name=mlm", "data.train=[a,b]", "objective.mask_prob=0.25"])
    saved = tmp_path / "out" / "nested" / "config.yaml"
    save_config(cfg, saved)
    assert "runs/mlm" in saved.read_text() and "${" not in saved.read_text()
    assert load_config(str(saved), []) == cfg
    assert config_to_yaml(cfg) == saved.read_text()


def test_config_to_dict_is_plain_and_resolved() -> None:
    cfg = load_config(None, ["objective.name=clm", "data.train=x"])
    d = config_to_dict(cfg)
    assert type(d) is dict and type(d["optim"]["betas"]) is list
    assert d["run"]["dir"] == "runs/clm" and d["trainer"]["max_steps"] == 1000


def test_config_from_dict_round_trip_and_validation() -> None:
    cfg = load_config(None, ["objective.name=mlm", "data.train=x", "objective.mask_prob=0.3"])
    assert config_from_dict(config_to_dict(cfg)) == cfg
    bad = config_to_dict(cfg) | {"trainer": {"max_stpes": 1}}
    with pytest.raises(ConfigError, match=r"^config dict: unknown key 'trainer.max_stpes'"):
        config_from_dict(bad)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs/experiments").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_experiment_config_loads_and_validates(path):
    """A renamed key or a stale default in a shipped config fails here, not on a user's machine."""
    cfg = load_config(str(path), [])
    assert cfg.objective.name and cfg.model.name and cfg.trainer.max_steps >= 1
