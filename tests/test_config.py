"""The recipe schema: defaults in one place, strict keys and types, every problem reported at once."""

from __future__ import annotations

import pytest

from qlorakit.config import Recipe, RecipeError, describe_recipe, dump_recipe, load_recipe


def test_defaults_and_overrides():
    r = load_recipe(None, ["train.lr=1e-4", "lora.r=8", "lora.targets=[q_proj,v_proj]", "data.eval=null"])
    assert r.train.lr == 1e-4 and r.lora.r == 8 and r.lora.targets == ["q_proj", "v_proj"]
    assert r.data.eval is None
    assert r.train.max_grad_norm == 0.3  # the QLoRA paper's clipping
    assert r.model.quant_type == "nf4" and r.model.double_quant is True
    assert load_recipe(None).lora.targets == ["all-linear"]


def test_yaml_round_trip(tmp_path):
    r = load_recipe(None, ["train.epochs=2", "name=x"])
    p = tmp_path / "r.yaml"
    p.write_text(dump_recipe(r))
    assert load_recipe(p) == r


def test_on_off_settings_take_yaml_booleans(tmp_path):
    # YAML reads a bare on/off as true/false; the on/off settings take them as meant
    assert load_recipe(None, ["train.gradient_checkpointing=on"]).train.gradient_checkpointing == "on"
    assert load_recipe(None, ["train.gradient_checkpointing=off"]).train.gradient_checkpointing == "off"
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  gradient_checkpointing: on\n")
    assert load_recipe(p).train.gradient_checkpointing == "on"
    with pytest.raises(RecipeError, match="data.licence_policy"):  # other choices still want their own words
        load_recipe(None, ["data.licence_policy=on"])


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  learning_rat: 3e-4\nlora:\n  rank: 8\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert str(p) in msg and "2 problem" in msg
    assert "train.learning_rat: unknown key; did you mean 'train.lr'?" in msg
    assert "lora.rank: unknown key; did you mean 'lora.r'?" in msg


def test_wrong_types_and_values_all_reported():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["lora.r=abc", "model.compute_dtype=bf61", "train.epochs=-1", "data.packing=maybe"])
    msg = str(e.value)
    assert "lora.r: expected an integer, got 'abc'" in msg
    assert "model.compute_dtype: expected one of 'auto', 'bf16', 'fp32', got 'bf61' (did you mean 'bf16'?)" in msg
    assert "data.packing: expected true or false" in msg


def test_bad_yaml_names_file_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: line \d+ is not valid YAML"):
        load_recipe(p)


def test_every_setting_has_help():
    rows = describe_recipe()
    assert len(rows) > 30
    assert all(help_ for _, _, help_ in rows), [k for k, _, h in rows if not h]
    assert Recipe().train.max_grad_norm == 0.3


@pytest.mark.parametrize("override,message", [
    ("train.epochs=.inf", "train.epochs: expected a finite number, got inf"),
    ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
    ("lora.alpha=inf", "lora.alpha: expected a finite number, got inf"),
    ("train.betas=[0.9, .inf]", "train.betas[1]: expected a finite number, got inf"),
    ("train.weight_decay=-5", "train.weight_decay: expected >= 0, got -5.0"),
    ("train.memory_budget_gb=-3", "train.memory_budget_gb: expected a positive number of GB, got -3.0"),
    ("eval.samples=-1", "eval.samples: expected >= 0, got -1"),
    ("eval.limit=-5", "eval.limit: expected a positive integer or null, got -5"),
    ("eval.gate.max_retention_drop=-1", "eval.gate.max_retention_drop: expected >= 0, got -1.0"),
    ("export.max_token_disagreement=1.5", "export.max_token_disagreement: expected a share between 0 and 1, got 1.5"),
    ("export.loss_examples=-2", "export.loss_examples: expected >= 0, got -2"),
    ("data.train=", "data.train: expected a data file or folder, or 'sample'; got an empty value"),
    ("eval.suites=[quality, retension]",
     "eval.suites: unknown suite(s) 'retension' (did you mean 'retention'?); expected some of quality, retention"),
])
def test_values_out_of_range_are_refused_before_any_work(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    assert message in str(e.value)
    assert "1 problem(s)" in str(e.value)


def test_type_and_range_problems_are_reported_together_each_once():
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["train.lr=abc", "train.epochs=-1", "train.betas=[0.9, x]", "eval.suites=[nope]"])
    msg = str(e.value)
    assert "4 problem(s)" in msg
    for part in ("train.lr: expected a number, got 'abc'", "train.epochs: expected a positive number, got -1.0",
                 "train.betas[1]: expected a number, got 'x'", "eval.suites: unknown suite(s) 'nope'"):
        assert part in msg
    assert load_recipe(None, ["eval.suites=[quality, safety]"]).eval.suites == ["quality", "safety"]
