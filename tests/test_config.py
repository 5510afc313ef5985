"""The one config object: YAML/JSON loading, overrides, fingerprints, run-dir record."""
import json

import pytest

from icons_fast.config import Config


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
