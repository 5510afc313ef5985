"""The command line: flags generated from the config, one-line errors, the rank-aware logger."""
import logging
import subprocess
import sys

import pytest

from icons_fast.cli import COMMANDS, UsageError, build_config, flag_settings, main, make_parser
from icons_fast.config import Config, settings
from icons_fast.logs import log_level, setup_logging

# Settings without a flag: set them in a config file or with --set.
CONFIG_FILE_ONLY = {
    "model.lora_dropout", "model.lora_targets",
    "warmup.warmup_ratio", "warmup.weight_decay", "warmup.batch_size", "warmup.num_checkpoints",
    "train.batch_size", "train.warmup_ratio", "train.weight_decay",
    "features.seed", "features.target_mode", "features.store_dtype",
}

# Every flag the CLI had before it was generated from the config: flag -> (key, a value to pass, parsed value).
FLAGS = {
    "--train-data": ("data.train_data", "pool.json", "pool.json"),
    "--image-folder": ("data.image_folder", "imgs", "imgs"),
    "--target-image-folder": ("data.target_image_folder", "timgs", "timgs"),
    "--max-length": ("data.max_length", "512", 512),
    "--model": ("model.model", "small", "small"),
    "--dtype": ("model.dtype", "bfloat16", "bfloat16"),
    "--lora-r": ("model.lora_r", "8", 8),
    "--lora-alpha": ("model.lora_alpha", "16", 16),
    "--warmup-fraction": ("warmup.fraction", "0.1", 0.1),
    "--warmup-epochs": ("warmup.epochs", "2", 2),
    "--lr": ("warmup.lr", "1e-3", 1e-3),
    "--proj-dim": ("features.proj_dim", "1024", 1024),
    "--backend": ("features.backend", "torch", "torch"),
    "--batch-size": ("features.batch_size", "4", 4),
    "--train-mode": ("features.train_mode", "sgd", "sgd"),
    "--shard-size": ("features.shard_size", "64", 64),
    "--budget": ("select.budget", "100", 100.0),
    "--top-percent": ("select.top_percent", "15", 15.0),
    "--aggregate": ("select.aggregate", "topm:3", "topm:3"),
    "--tie-break": ("select.tie_break", "index", "index"),
    "--seed": ("seed", "3", 3),
    "--device": ("device", "cpu", "cpu"),
    "--out": ("out", "runs/x", "runs/x"),
}
# Flags that exist on one command only.
COMMAND_FLAGS = {
    "select": {"--rule": ("select.rule", "less", "less")},
    "train": {"--epochs": ("train.epochs", "3", 3), "--train-lr": ("train.lr", "5e-5", 5e-5)},
}


_PARSER = make_parser()


def _parse(argv):
    return build_config(_PARSER.parse_args(argv))


def test_every_setting_has_a_flag_or_is_config_file_only():
    keys = {s.key for s in settings()}
    with_flag = {s.key for s in settings() if s.meta("flag")}
    assert CONFIG_FILE_ONLY <= keys, f"stale names: {CONFIG_FILE_ONLY - keys}"
    missing = keys - with_flag - CONFIG_FILE_ONLY
    assert not missing, f"neither a flag nor config-file-only: {missing}"
    assert not with_flag & CONFIG_FILE_ONLY
    flags = [s.meta("flag") for s in settings() if s.meta("flag")]
    assert len(flags) == len(set(flags)), "two settings share a flag"
    for s in settings():
        assert set(s.meta("commands") or ()) <= set(COMMANDS), f"{s.key} names a command that does not exist"


@pytest.mark.parametrize("flag", sorted(FLAGS))
def test_existing_flags_keep_their_names_and_keys(flag):
    key, text, value = FLAGS[flag]
    for command in ("warmup", "featurize", "run", "select"):
        cfg = _parse([command, flag, text])
        assert cfg.get(key) == pytest.approx(value) if isinstance(value, float) else cfg.get(key) == value
        assert _parse([command]).get(key) == Config().get(key)  # absent flag: the field's default


@pytest.mark.parametrize("command", sorted(COMMAND_FLAGS))
def test_command_specific_flags(command):
    for flag, (key, text, value) in COMMAND_FLAGS[command].items():
        assert _parse([command, flag, text]).get(key) == pytest.approx(value)
        with pytest.raises(UsageError, match="unrecognized arguments"):
            _PARSER.parse_args(["warmup", flag, text])
    if command == "train":
        assert _parse(["train", "--full-finetune"]).train.full_finetune is True
        assert _parse(["train"]).train.full_finetune is False


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_works_and_shows_the_fields_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for s in flag_settings(command) if command != "report" else []:
        assert s.meta("flag") in out
        if s.type in (int, float, str) and s.default is not None:
            assert f"(default: {s.default})" in out, f"{s.meta('flag')} does not show its default"


def test_precedence_config_file_then_set_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("features:\n  proj_dim: 2048\n  shard_size: 32\nselect:\n  budget: 0.1\n"
                    "data:\n  targets:\n    vqa: v.json\n")
    cfg = _parse(["select", "--config", str(path), "--set", "features.proj_dim=4096", "--set", "select.budget=0.3",
                  "--budget", "0.5", "--target", "ocr=o.json", "--target", "vqa=v2.json"])
    assert cfg.features.shard_size == 32  # from the file
    assert cfg.features.proj_dim == 4096  # --set over the file
    assert cfg.select.budget == 0.5  # the flag over --set
    assert cfg.data.targets == {"vqa": "v2.json", "ocr": "o.json"}  # --target merged into the file's targets


def _run(argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.err


def test_missing_train_data_is_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nope.json")
    rc, err = _run(["warmup", "--train-data", missing, "--out", str(tmp_path / "run")], capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("icons-fast: error: ") and missing in lines[0]
    assert "Traceback" not in err
    rc, err = _run(["-v", "warmup", "--train-data", missing, "--out", str(tmp_path / "run")], capsys)
    assert rc == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("icons-fast: error: ")


def test_bad_set_value_is_a_config_error(capsys):
    rc, err = _run(["influence", "--set", "features.proj_dim=lots"], capsys)
    assert rc == 2 and err.strip() == "icons-fast: error: features.proj_dim: expected an integer, got 'lots'"
    rc, err = _run(["influence", "--set", "features.proj_dimm=8"], capsys)
    assert rc == 2 and "unknown config key 'features.proj_dimm'" in err and len(err.strip().splitlines()) == 1
    rc, err = _run(["influence", "--set", "select.aggregate=median"], capsys)
    assert rc == 2 and "select.aggregate: 'median' is not allowed; choose from mean, max, topm:<m>" in err


def test_bad_choice_is_a_usage_error(capsys):
    rc, err = _run(["featurize", "--train-mode", "adamw"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("icons-fast: error: argument --train-mode:") and "'adamw'" in err and "adam, sgd" in err
    rc, err = _run(["select", "--aggregate", "topm:x"], capsys)
    assert rc == 2 and "argument --aggregate" in err and "topm:<m>" in err
    rc, err = _run(["frobnicate"], capsys)
    assert rc == 2 and err.startswith("icons-fast: error: argument COMMAND: invalid choice")
    rc, err = _run(["evaluate", "--model-dir", "m"], capsys)
    assert rc == 2 and err.strip() == "icons-fast: error: evaluate needs at least one --target NAME=FILE.json"


def test_log_level_is_rank_aware():
    assert log_level(rank=0) == logging.INFO
    assert log_level(rank=1) == logging.WARNING
    assert log_level(verbose=True, rank=1) == logging.DEBUG
    assert log_level(quiet=True, rank=0) == logging.WARNING


def test_records_go_to_stderr_with_the_rank_under_torchrun(monkeypatch, capsys):
    log = logging.getLogger("icons_fast.stages.featurize")
    try:
        monkeypatch.setenv("RANK", "1")
        monkeypatch.setenv("WORLD_SIZE", "2")
        setup_logging()
        log.info("hidden on rank 1")
        log.warning("shown on every rank")
        setup_logging(verbose=True)
        log.debug("details")
        err = capsys.readouterr().err
        assert "hidden" not in err and "[rank 1] [featurize] shown on every rank" in err and "details" in err
        monkeypatch.delenv("RANK")
        monkeypatch.delenv("WORLD_SIZE")
        setup_logging()
        log.info("rank 0 at INFO")
        captured = capsys.readouterr()
        assert captured.err.strip() == "[featurize] rank 0 at INFO" and captured.out == ""
        assert len(logging.getLogger("icons_fast").handlers) == 1  # set-up replaces its handler
    finally:
        setup_logging(quiet=True)


def test_parser_builds_without_torch():
    """``icons-fast --help`` and every command's flags come up without importing torch."""
    code = ("import sys; from icons_fast.cli import make_parser; make_parser(); "
            "import icons_fast.logs; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
