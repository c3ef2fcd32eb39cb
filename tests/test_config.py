"""Config: presets, overrides, validation messages, and every shipped recipe loads and validates."""

from pathlib import Path

import pytest

from rlhf_pg.config import (PRESETS, RunConfig, build_config, describe_fields, dump_config, load_config,
                            parse_overrides, read_yaml)
from rlhf_pg.errors import UserError

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), "recipes open with a comment header (purpose, command, expectations)"
    assert "rlhf-pg train" in path.read_text(), "the header shows the command that runs it"


def test_there_are_recipes():
    assert any(p.name == "grpo_arithmetic.yaml" for p in RECIPES)


def test_overrides_parse_yaml_scalars_and_nest():
    assert parse_overrides(["algo.kl_coef=0.02", "train.max_steps=5", "rollout.stop=[\"\\n\"]", "data.eval=null"]) == {
        "algo": {"kl_coef": 0.02}, "train": {"max_steps": 5}, "rollout": {"stop": ["\n"]}, "data": {"eval": None}}


def test_precedence_preset_recipe_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algo:\n  name: ppo\n  epochs: 3\ntrain:\n  lr: 0.001\n")
    cfg = load_config(recipe, ["train.lr=0.002"])
    assert cfg.algo.advantage == PRESETS["ppo"]["advantage"] == "gae"  # from the preset
    assert cfg.algo.epochs == 3  # recipe beats preset
    assert cfg.train.lr == 0.002  # override beats recipe


def test_presets_are_valid_algo_fields():
    for name, preset in PRESETS.items():
        cfg = load_config(None, [f"algo.name={name}", "rollout.group_size=4"])
        for k, v in preset.items():
            assert getattr(cfg.algo, k) == v


@pytest.mark.parametrize("overrides, expected", [
    (["algo.kl_cof=0.1"], "unknown config key 'algo.kl_cof' — did you mean 'algo.kl_coef'?"),
    (["algo.kl_coef=abc"], "config key 'algo.kl_coef'"),
    (["train.lr=-1"], "greater than 0"),
    (["rollout.group_size=1"], "rollout.group_size >= 2"),
    (["algo.name=ppx"], "did you mean 'ppo'"),
    (["algo.advantage=gea"], "unknown algo.advantage 'gea'"),
    (["algo.minibatches=3"], "not divisible by algo.minibatches=3"),
    (["algo.kl_target=0.1"], "needs algo.kl_in=reward"),
    (["bogus"], "is not key=value"),
])
def test_bad_config_is_one_clear_line(overrides, expected):
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert expected in msg and "\n" not in msg


def test_missing_and_malformed_recipe(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n   lr: [1\n")
    with pytest.raises(UserError, match=r"not valid YAML at line \d+"):
        read_yaml(bad)


def test_dump_roundtrip_and_docs():
    cfg = load_config(None, ["algo.kl_coef=0.05"])
    import yaml

    again = RunConfig.model_validate(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    rows = describe_fields()
    keys = [k for k, _, _ in rows]
    assert "algo.kl_coef" in keys and "train.max_steps" in keys
    assert all(doc.strip() for _, _, doc in rows), "every option has a docstring"


def test_bare_no_is_the_string_no():
    """YAML 1.1 reads `no` as false; `train.mixed_precision=no` must still mean "no"."""
    cfg = build_config(parse_overrides(["train.mixed_precision=no"]))
    assert cfg.train.mixed_precision == "no"
