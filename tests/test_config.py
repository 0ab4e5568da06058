import pytest

from taopd.config import Config, list_recipes, load_config
from taopd.errors import UserError


def test_every_shipped_recipe_validates():
    names = list_recipes()
    assert {"demo", "qwen2.5-7b-to-1.5b-gsm8k", "qwen3-8b-to-1.7b-math"} <= set(names)
    for name in names:
        assert isinstance(load_config(name), Config)


def test_overrides_are_parsed_as_yaml_and_nested():
    cfg = load_config(
        "demo",
        [
            "selection.ratio=0.1",
            "train.steps=3",
            "task.params.max_terms=3",
            "optim.betas=[0.9, 0.95]",
            "lora={r: 8}",
        ],
    )
    assert cfg.selection.ratio == 0.1 and cfg.train.steps == 3
    assert cfg.task.params["max_terms"] == 3 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.lora is not None and cfg.lora.r == 8


def test_unknown_keys_and_bad_values_in_one_message():
    with pytest.raises(UserError) as err:
        load_config(
            None,
            [
                "selection.ratoi=0.1",
                "selection.ratio=1.5",
                "train.steps=many",
                "selection.strategy=magic",
            ],
        )
    msg = str(err.value)
    assert "selection.ratoi: unknown key" in msg
    assert "selection.ratio: ratio must be in (0, 1]" in msg
    assert "train.steps:" in msg and "selection.strategy: strategy must be one of" in msg


def test_missing_config_file_names_the_recipes(tmp_path):
    with pytest.raises(UserError, match="does not exist.*demo"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_syntax():
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["selection.ratio"])
