"""Config: presets, overrides, validation messages, and every shipped recipe loads and validates."""

from pathlib import Path

import pytest

from rlhf_pg.config import (
    PRESETS,
    RunConfig,
    build_config,
    describe_fields,
    dump_config,
    load_config,
    parse_overrides,
    read_yaml,
)
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
    assert parse_overrides(["algo.kl_coef=0.02", "train.max_steps=5", 'rollout.stop=["\\n"]', "data.eval=null"]) == {
        "algo": {"kl_coef": 0.02},
        "train": {"max_steps": 5},
        "rollout": {"stop": ["\n"]},
        "data": {"eval": None},
    }


def test_precedence_preset_recipe_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("algo:\n  name: ppo\n  gae: {lam: 0.9}\nbatch:\n  epochs: 3\ntrain:\n  lr: 0.001\n")
    cfg = load_config(recipe, ["train.lr=0.002"])
    assert cfg.algo.advantage == PRESETS["ppo"]["algo"]["advantage"] == "gae"  # from the preset
    assert cfg.batch.epochs == 3 and PRESETS["ppo"]["batch"]["epochs"] == 2  # recipe beats preset
    assert cfg.algo.options("gae").lam == 0.9  # an option section: recipe beats preset
    assert cfg.train.lr == 0.002  # override beats recipe


def test_presets_are_valid_fields():
    for name, preset in PRESETS.items():
        cfg = load_config(None, [f"algo.name={name}", "batch.group_size=4"])
        for section, values in preset.items():
            got = getattr(cfg, section).model_dump()
            for k, v in values.items():  # an option section (a dict) may hold more defaults than the preset sets
                assert ({**got[k], **v} == got[k]) if isinstance(v, dict) else got[k] == v, (name, section, k)


def test_option_sections_are_validated_by_their_entry():
    cfg = load_config(None, ["algo.advantage=reinforce", "algo.reinforce.baseline=loo", "batch.group_size=2"])
    assert cfg.algo.options("reinforce").baseline == "loo"
    assert cfg.algo.options("clip").eps_high == 0.2  # the selected loss gets its defaults
    assert cfg.algo.options("gae") is None  # not selected, not given
    with pytest.raises(UserError, match="algo.reinforce.baseline"):
        load_config(None, ["algo.advantage=reinforce", "algo.reinforce.baseline=median"])


def test_requirements_come_from_registry_metadata():
    from rlhf_pg import core

    @core.ADVANTAGES.register("needs_three", min_group_size=3)
    def needs_three(x, opts, state):
        return core.rloo_advantages(x)

    try:
        with pytest.raises(UserError, match="batch.group_size >= 3"):
            load_config(None, ["algo.advantage=needs_three", "batch.group_size=2"])
        assert load_config(None, ["algo.advantage=needs_three", "batch.group_size=3"]).algo.advantage == "needs_three"
    finally:
        core.ADVANTAGES.unregister("needs_three")
    # reinforce needs G >= 2 only with a group baseline (a function of its options)
    assert load_config(None, ["algo.name=reinforce", "batch.group_size=1"]).batch.group_size == 1
    with pytest.raises(UserError, match="batch.group_size >= 2"):
        load_config(None, ["algo.name=reinforce", "algo.reinforce.baseline=loo", "batch.group_size=1"])


@pytest.mark.parametrize(
    "old, new",
    [
        ("rollout.group_size=2", "batch.group_size"),
        ("rollout.prompts_per_step=4", "batch.prompts_per_step"),
        ("rollout.eval_batch_size=4", "batch.eval_batch_size"),
        ("train.micro_batch_size=4", "batch.micro_batch_size"),
        ("algo.epochs=2", "batch.epochs"),
        ("algo.minibatches=2", "batch.minibatch_size"),
        ("algo.scale=none", "algo.grpo.scale"),
        ("algo.lam=0.9", "algo.gae.lam"),
        ("algo.baseline=loo", "algo.reinforce.baseline"),
        ("algo.clip_eps_high=0.28", "algo.clip.eps_high"),
        ("algo.loss_agg_constant=8", "algo.constant.value"),
    ],
)
def test_renamed_keys_name_the_new_key(old, new):
    with pytest.raises(UserError) as e:
        load_config(None, [old])
    assert f"use '{new}" in str(e.value) and "\n" not in str(e.value)


def test_batch_plan_per_process():
    from rlhf_pg.config import batch_plan

    cfg = load_config(
        None,
        [
            "batch.prompts_per_step=8",
            "batch.group_size=4",
            "batch.minibatch_size=16",
            "batch.epochs=2",
            "batch.micro_batch_size=8",
        ],
    )
    plan = batch_plan(cfg, world=2)
    assert (plan.rollout, plan.minibatches, plan.optimizer_steps) == (32, 2, 4)
    assert plan.describe() == (
        "32 completions = 8 prompts × 4; 2 epochs of 2 minibatches of 16 (8 per process); "
        "micro-batches of 8 per process; 4 optimizer steps per RL step"
    )
    # the review's case: 6 prompts × 2 on 2 processes with 4 minibatches (of 3): a minibatch cannot be
    # split equally over the processes, so the run stops at once instead of taking 3 optimizer steps.
    cfg = load_config(None, ["batch.prompts_per_step=6", "batch.group_size=2", "batch.minibatch_size=3"])
    assert batch_plan(cfg, world=1).optimizer_steps == 4
    with pytest.raises(UserError, match="batch.minibatch_size=3 is not divisible by the 2 processes"):
        batch_plan(cfg, world=2)
    with pytest.raises(UserError, match="batch.prompts_per_step=6 is not divisible by the 4 processes"):
        batch_plan(cfg, world=4)


def test_batch_plan_with_a_token_budget():
    from rlhf_pg.config import batch_plan

    cfg = load_config(None, ["batch.micro_batch_size=64", "batch.micro_batch_tokens=2048"])
    assert "micro-batches of ≤ 64 completions and ≤ 2048 tokens per process" in batch_plan(cfg, world=1).describe()
    with pytest.raises(UserError) as e:
        load_config(None, ["batch.micro_batch_tokens=0"])
    assert "batch.micro_batch_tokens" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["algo.kl_cof=0.1"], "unknown config key 'algo.kl_cof' — did you mean 'algo.kl_coef'?"),
        (["algo.kl_coef=abc"], "config key 'algo.kl_coef'"),
        (["train.lr=-1"], "greater than 0"),
        (["batch.group_size=1"], "batch.group_size >= 2"),
        (["algo.name=ppx"], "did you mean 'ppo'"),
        (["algo.advantage=gea"], "unknown algo.advantage 'gea'"),
        (["batch.minibatch_size=3"], "batch.minibatch_size=3 does not divide the rollout of 32"),
        (["algo.grpo.scal=none"], "did you mean 'algo.grpo.scale'"),
        (["algo.kl_estimator=k4"], "unknown algo.kl_estimator 'k4'"),
        (["algo.loss_agg=mean"], "unknown algo.loss_agg 'mean'"),
        (["algo.kl_target=0.1"], "needs algo.kl_in=reward"),
        (["bogus"], "is not key=value"),
    ],
)
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
    assert "algo.kl_coef" in keys and "train.max_steps" in keys and "batch.minibatch_size" in keys
    assert "algo.grpo.scale" in keys and "algo.clip.eps_high" in keys  # registry entries' option sections
    assert all(doc.strip() for _, _, doc in rows), "every option has a docstring"


def test_bare_no_is_the_string_no():
    """YAML 1.1 reads `no` as false; `train.mixed_precision=no` must still mean "no"."""
    cfg = build_config(parse_overrides(["train.mixed_precision=no"]))
    assert cfg.train.mixed_precision == "no"
