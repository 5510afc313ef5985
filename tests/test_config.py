"""The one config object: YAML/JSON loading, overrides, fingerprints, run-dir record."""
import json

import pytest

from icons_fast import config
from icons_fast.config import Config, ConfigError, settings


def test_defaults_follow_the_paper():
    c = Config()
    assert (c.model.lora_r, c.model.lora_alpha, c.model.lora_dropout) == (128, 256, 0.05)
    assert c.features.proj_dim == 5120 and c.features.train_mode == "adam" and c.features.target_mode == "sgd"
    assert c.warmup.fraction == 0.05 and c.warmup.lr == 2e-4 and c.warmup.warmup_ratio == 0.03
    assert c.select.budget == 0.2


def test_yaml_and_json_load_with_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("features:\n  proj_dim: 8192\nselect:\n  budget: 0.1\ndata:\n  targets:\n    vqa: v.json\n")
    c = Config.load(str(y))
    assert c.features.proj_dim == 8192 and c.select.budget == 0.1 and c.data.targets == {"vqa": "v.json"}
    c.override({"features.proj_dim": "1024", "seed": "3", "warmup.lr": "1e-3"})
    assert c.features.proj_dim == 1024 and c.seed == 3 and c.warmup.lr == pytest.approx(1e-3)
    j = tmp_path / "c.json"
    j.write_text(json.dumps(c.to_dict()))
    assert Config.load(str(j)).to_dict() == c.to_dict()


def test_unknown_keys_raise():
    with pytest.raises(KeyError, match="proj_dimm"):
        Config().override({"features.proj_dimm": 3})
    with pytest.raises(KeyError, match="section"):
        Config().override({"feature.proj_dim": 3})


def test_fingerprint_and_saved_run_config(tmp_path):
    a, b = Config(), Config()
    assert a.fingerprint() == b.fingerprint()
    b.override({"select.budget": 0.1})
    assert a.fingerprint() != b.fingerprint()
    assert a.fingerprint("features", "model") == b.fingerprint("features", "model")
    path = b.save(str(tmp_path))
    saved = json.loads(open(path).read())
    assert saved["fingerprint"] == b.fingerprint()
    assert Config.load(path).to_dict() == b.to_dict()


@pytest.mark.parametrize("key, bad, allowed", [
    ("features.train_mode", "adamw", "adam, sgd"),
    ("features.target_mode", "lbfgs", "adam, sgd"),
    ("select.aggregate", "median", "mean, max, topm:<m>"),
    ("select.aggregate", "topm:0", "topm:<m>"),
    ("select.tie_break", "first", "mean_rank, index, random"),
    ("select.rule", "best", "icons, less, tracin"),
    ("model.dtype", "fp8", "float32, bfloat16, float16"),
    ("features.store_dtype", "int4", "float16, bfloat16, float32, int8"),
    ("features.backend", "cudnn", "auto, torch, triton"),
    ("device", "gpu", "auto, cpu, cuda, cuda:N"),
])
def test_bad_choices_name_the_key_the_value_and_the_allowed_ones(key, bad, allowed):
    with pytest.raises(ValueError) as exc:
        Config().override({key: bad})
    msg = str(exc.value)
    assert key in msg and repr(bad) in msg and allowed in msg


@pytest.mark.parametrize("key, good", [
    ("select.aggregate", "topm:5"), ("select.aggregate", "max"), ("device", "cuda:1"), ("device", "cpu"),
    ("features.store_dtype", "bf16"), ("features.backend", "triton"), ("select.rule", "tracin"),
])
def test_allowed_values_pass(key, good):
    c = Config().override({key: good})
    section, _, name = key.rpartition(".")
    assert getattr(getattr(c, section) if section else c, name) == good


def test_bad_types_and_files_are_refused_on_load(tmp_path):
    for key, bad in [("features.proj_dim", "abc"), ("features.proj_dim", 1.5), ("seed", True),
                     ("select.budget", "lots"), ("train.full_finetune", 3), ("data.targets", ["a.json"])]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            Config().override({key: bad})
    y = tmp_path / "c.yaml"
    y.write_text("select:\n  tie_break: first\n")
    with pytest.raises(ValueError, match=r"c\.yaml: select\.tie_break: 'first' is not allowed"):
        Config.load(str(y))
    y.write_text("features: [1, 2]\n")
    with pytest.raises(ConfigError, match="unknown config key 'features'"):
        Config.load(str(y))


def test_config_error_is_both_key_and_value_error():
    """Unknown keys always raised KeyError; bad values are ValueErrors; str() is the plain message."""
    with pytest.raises(KeyError) as exc:
        Config().override({"nope": 1})
    assert isinstance(exc.value, ValueError) and str(exc.value).startswith("unknown config key 'nope'")


def test_choice_tables_agree_with_the_code_that_uses_them():
    from icons_fast.data.conversation import TEMPLATES as TEMPLATE_TABLE
    from icons_fast.features.store import _DTYPE_ALIASES, DTYPES as STORE_TABLE
    from icons_fast.model.loading import DTYPES as MODEL_TABLE
    from icons_fast.select.rules import RULES as RULE_TABLE
    from icons_fast.select.voting import TIE_BREAKS as VOTING_TIE_BREAKS

    assert set(config.MODEL_DTYPES) == set(MODEL_TABLE)
    assert set(config.STORE_DTYPES) == set(STORE_TABLE) and set(config.STORE_DTYPE_ALIASES) == set(_DTYPE_ALIASES)
    assert set(config.RULES) == set(RULE_TABLE)
    assert tuple(config.TIE_BREAKS) == tuple(VOTING_TIE_BREAKS)
    assert tuple(config.TEMPLATES) == tuple(TEMPLATE_TABLE)


def test_every_setting_is_documented():
    for s in settings():
        assert s.meta("help"), f"{s.key} has no help text"
        choices = s.meta("choices")
        if choices and not s.meta("valid"):
            assert s.default in choices, f"{s.key}: default {s.default!r} is not one of its choices"
