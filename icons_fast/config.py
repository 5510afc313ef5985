"""The one configuration object of icons-fast.

``Config`` groups every setting of the pipeline in dataclass sections. It is
loaded from YAML or JSON (``Config.load``), overridden from the command line
(``config.override({"features.proj_dim": 8192})``), and written with its
fingerprint into every run directory (``config.save``), so a rerun can tell
whether earlier outputs were made under the same settings.

Each setting is written once, here: its default, its help text, its allowed
values and its command-line flag live in the field's metadata (``setting``),
and ``icons_fast.cli`` builds the flags from them. A field with ``flag=None``
is set from a config file or ``--set`` only. Values are type-checked and
string choices validated whenever a config loads or is overridden; a bad one
raises ``ConfigError`` naming the key, the value and what is allowed.

Stage fingerprints (``Config.fingerprint(*sections)``) hash only the sections a
stage depends on, so changing the selection budget does not invalidate the
features.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Allowed values of the string settings. The modules that act on them keep their own tables
# (tests/test_config.py checks that the two agree); these are here so that a bad value fails
# when the config loads, not hours later in the stage that reads it.
MODEL_DTYPES = ("float32", "bfloat16", "float16")  # icons_fast.model.loading.DTYPES
STORE_DTYPES = ("float16", "bfloat16", "float32", "int8")  # icons_fast.features.store.DTYPES
STORE_DTYPE_ALIASES = ("fp16", "half", "bf16", "fp32", "float")  # accepted by features.store.canonical_dtype
GRADIENT_MODES = ("adam", "sgd")  # icons_fast.features.extractor.GradientExtractor(mode=...)
BACKENDS = ("auto", "torch", "triton")  # the backends both featurize ops (lora_grad and project) have
TIE_BREAKS = ("mean_rank", "index", "random")  # icons_fast.select.voting.TIE_BREAKS
RULES = ("icons", "less", "tracin", "mean", "max", "rank", "znorm", "random")  # icons_fast.select.rules.RULES
AGGREGATES = ("mean", "max", "topm:<m>")  # icons_fast.select.influence.parse_aggregate
TEMPLATES = ("auto", "vicuna_v1", "chat")  # icons_fast.data.conversation.TEMPLATES


class ConfigError(KeyError, ValueError):
    """A config key that does not exist, or a value a setting cannot take.

    A ``KeyError`` (unknown keys always raised one) and a ``ValueError`` (bad
    values); ``str()`` is the plain message, without ``KeyError``'s quotes.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _aggregate_ok(value: str) -> bool:
    if value in ("mean", "max"):
        return True
    m = re.fullmatch(r"topm:(\d+)", value)
    return m is not None and int(m.group(1)) >= 1


def _device_ok(value: str) -> bool:
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None,
            choices: tuple | None = None, valid: Callable[[Any], bool] | None = None,
            default_help: str | None = None, commands: tuple[str, ...] | None = None,
            metavar: str | None = None, default_factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its documentation and command-line flag (read by ``icons_fast.cli``).

    Args:
        default / default_factory: the default, as for ``dataclasses.field``.
        help: one phrase saying what the setting does (the CLI appends the default).
        flag: the command-line flag (``"--lr"``); None: set from a config file or ``--set`` only.
        choices: the allowed values (checked on load and override, listed by ``--help``).
        valid: a predicate for values that a list cannot hold (``topm:<m>``); ``choices``
            then names the allowed forms in messages.
        default_help: what a ``None`` default means (``"--image-folder"``).
        commands: the flag exists only on these commands (default: every configured command).
        metavar: the flag's value name in ``--help``.
    """
    meta = {"help": help, "flag": flag, "choices": choices, "valid": valid, "default_help": default_help,
            "commands": commands, "metavar": metavar}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    train_data: str | None = setting(None, flag="--train-data", metavar="FILE_DIR_OR_ID",
                                     help="the pool: LLaVA .json, .jsonl (ShareGPT / OpenAI messages), parquet or "
                                          "arrow file or folder, or a Hugging Face dataset id owner/name[:split]")
    image_folder: str | None = setting(None, flag="--image-folder", metavar="DIR",
                                       help="folder the records' image paths are relative to")
    targets: dict[str, str] = setting(
        default_factory=dict, flag="--target", metavar="NAME=FILE.json",
        help="a target task's samples (repeatable); NAME may be task/subtask")
    target_image_folder: str | None = setting(None, flag="--target-image-folder", metavar="DIR",
                                              default_help="--image-folder", help="folder of the target sets' images")
    max_length: int = setting(2048, flag="--max-length",
                              help="samples longer than this many tokens are recorded and excluded")
    template: str = setting("auto", flag="--template", choices=TEMPLATES,
                            help="conversation template: the model's own chat template (chat), LLaVA-1.5's "
                                 "vicuna_v1, or auto (vicuna_v1 for LLaVA-1.5 and models without a chat template)")


@dataclass
class ModelConfig:
    model: str = setting("tiny", flag="--model", metavar="NAME_OR_DIR",
                         help="llava-hf or causal-LM directory or Hugging Face id, or 'tiny' / 'small' (built-in test model)")
    dtype: str = setting("float32", flag="--dtype", choices=MODEL_DTYPES, help="model weights and activations")
    lora_r: int = setting(128, flag="--lora-r", help="LoRA rank r")
    lora_alpha: int = setting(256, flag="--lora-alpha", help="LoRA alpha (the adapter is scaled by alpha / r)")
    lora_dropout: float = setting(0.05, help="LoRA dropout during warmup and training")
    lora_targets: list[str] = setting(default_factory=lambda: list(LLAMA_LORA_TARGETS),
                                      help="names of the language model's linear layers that get LoRA")


@dataclass
class WarmupConfig:
    fraction: float = setting(0.05, flag="--warmup-fraction", help="seeded random fraction of the pool used for warmup")
    epochs: int = setting(1, flag="--warmup-epochs", help="warmup epochs")
    lr: float = setting(2e-4, flag="--lr", help="warmup learning rate")
    warmup_ratio: float = setting(0.03, help="fraction of the warmup steps spent ramping the learning rate up")
    weight_decay: float = setting(0.0, help="AdamW weight decay of the warmup")
    batch_size: int = setting(4, help="warmup batch size")
    num_checkpoints: int = setting(1, help="checkpoints spread evenly over the warmup, the last one at its end")


@dataclass
class TrainConfig:
    """Fine-tuning on a (selected) subset: ``icons-fast train``."""

    epochs: int = setting(1, flag="--epochs", commands=("train",), help="training epochs")
    lr: float = setting(2e-4, flag="--train-lr", commands=("train",), help="fine-tuning learning rate")
    batch_size: int = setting(8, help="fine-tuning batch size")
    warmup_ratio: float = setting(0.03, help="fraction of the steps spent ramping the learning rate up")
    weight_decay: float = setting(0.0, help="AdamW weight decay of the fine-tuning")
    full_finetune: bool = setting(False, flag="--full-finetune", commands=("train",),
                                  help="train every parameter instead of LoRA (used to pre-train the tiny base)")


@dataclass
class FeatureConfig:
    proj_dim: int = setting(5120, flag="--proj-dim", help="projection dimension k")
    seed: int = setting(0, help="seed of the random projection")
    train_mode: str = setting("adam", flag="--train-mode", choices=GRADIENT_MODES,
                              help="pool gradient preconditioning: adam (LESS) or sgd (released ICONS code)")
    target_mode: str = setting("sgd", choices=GRADIENT_MODES, help="target gradient preconditioning")
    backend: str = setting("auto", flag="--backend", choices=BACKENDS,
                           help="implementation of the gradient and projection ops (icons_fast.ops.backend)")
    batch_size: int = setting(8, flag="--batch-size", help="featurize batch size")
    shard_size: int = setting(4096, flag="--shard-size", help="samples per feature shard")
    store_dtype: str = setting("float16", choices=STORE_DTYPES + STORE_DTYPE_ALIASES,
                               help="dtype of the stored features")


@dataclass
class SelectConfig:
    budget: float = setting(0.2, flag="--budget", help="fraction (0.2) or count (>= 1) of the pool to select")
    top_percent: float | None = setting(None, flag="--top-percent", default_help="the budget's percentage",
                                        help="per-task vote threshold")
    aggregate: str = setting("mean", flag="--aggregate", choices=AGGREGATES, valid=_aggregate_ok,
                             help="how a sample's scores against a task's target samples are combined")
    tie_break: str = setting("mean_rank", flag="--tie-break", choices=TIE_BREAKS,
                             help="order of the samples tied at the vote cut")
    rule: str = setting("icons", flag="--rule", choices=RULES, commands=("select",),
                        help="selection rule: icons is the vote; any other writes selection/rule-NAME/")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    seed: int = setting(0, flag="--seed", help="seed of the warmup subset, training and random choices")
    device: str = setting("auto", flag="--device", choices=("auto", "cpu", "cuda", "cuda:N"), valid=_device_ok,
                          help="auto uses cuda when available")
    out: str = setting("runs/icons", flag="--out", metavar="DIR", help="run directory")

    def resolved_device(self) -> str:
        """The torch device string this run uses."""
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        cfg = cls()
        cfg.override(_flatten(d))
        return cfg

    @classmethod
    def load(cls, path: str) -> "Config":
        """Load a YAML (.yaml/.yml) or JSON config; unknown keys and bad values raise ``ConfigError``."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                d = yaml.safe_load(f) or {}
            else:
                d = json.load(f)
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: a config file holds a mapping of sections, got a {type(d).__name__}")
        if "fingerprint" in d and "config" in d:  # a saved run config
            d = d["config"]
        try:
            return cls.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def save(self, run_dir: str) -> str:
        """Write ``run_dir/config.json`` (resolved config + fingerprint) atomically."""
        from icons_fast.fileio import atomic_json

        payload = {"fingerprint": self.fingerprint(), "config": self.to_dict()}
        return atomic_json(os.path.join(run_dir, "config.json"), payload, sort_keys=True)

    # ------------------------------------------------------------ overrides
    def get(self, key: str) -> Any:
        """The value of dotted ``key``, e.g. ``cfg.get("features.proj_dim")``."""
        obj = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def override(self, updates: dict[str, Any]) -> "Config":
        """Set dotted keys, e.g. ``{"features.proj_dim": 8192, "seed": 1}``; None values are skipped.

        String values are parsed as YAML scalars ("8192" -> 8192, "true" -> True)
        when the field is not a string. Unknown keys, values of the wrong type and
        values outside a setting's choices raise ``ConfigError`` (a ``KeyError``
        and a ``ValueError``) naming the key, the value and what is allowed.
        """
        for key, value in updates.items():
            if value is None:
                continue
            obj = self
            parts = key.split(".")
            for p in parts[:-1]:
                if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
                    raise ConfigError(f"unknown config section {p!r} in {key!r}; sections: {_sections(self)}")
                obj = getattr(obj, p)
            name = parts[-1]
            fields = {f.name: f for f in dataclasses.fields(obj)}
            if name not in fields or dataclasses.is_dataclass(getattr(obj, name)):
                raise ConfigError(f"unknown config key {key!r}; valid keys here: {list(fields)}")
            setattr(obj, name, check_value(key, fields[name], _field_type(type(obj), name), value))
        return self

    # ---------------------------------------------------------- fingerprint
    def fingerprint(self, *sections: str) -> str:
        """sha256 (16 hex chars) of the named sections (all of them when none)."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Setting:
    """One leaf of ``Config``: its dotted key, dataclass field and (non-None) value type."""

    key: str
    field: dataclasses.Field
    type: type

    @property
    def default(self) -> Any:
        f = self.field
        return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default

    def meta(self, name: str) -> Any:
        return self.field.metadata.get(name)


@functools.lru_cache(maxsize=None)
def settings() -> tuple[Setting, ...]:
    """Every leaf setting of ``Config``, in declaration order (sections flattened: ``"features.proj_dim"``)."""
    return tuple(_leaves(Config, ""))


def _leaves(cls: type, prefix: str) -> Iterator[Setting]:
    for f in dataclasses.fields(cls):
        tp = _field_type(cls, f.name)
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield Setting(prefix + f.name, f, tp)


@functools.lru_cache(maxsize=None)
def _field_type(cls: type, name: str) -> type:
    """The declared type of ``cls.name`` without ``| None`` and type arguments (``dict[str, str]`` -> dict)."""
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def check_value(key: str, f: dataclasses.Field, tp: type, value: Any) -> Any:
    """``value`` parsed and checked for setting ``key`` (field ``f`` of type ``tp``); ``ConfigError`` if bad."""
    if isinstance(value, str) and tp is not str:
        value = _parse_scalar(key, tp, value)
    optional = f.default is None
    if value is None and optional:
        return None
    if tp in (int, float) and isinstance(value, numbers.Integral if tp is int else numbers.Real) \
            and not isinstance(value, bool):
        value = tp(value)  # numpy scalars, and ints for float settings
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}{' or null' if optional else ''}, got {value!r}")
    if tp is dict and not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{key}: expected a mapping of names to file paths, got {value!r}")
    choices, valid = f.metadata.get("choices"), f.metadata.get("valid")
    if choices and not (valid(value) if valid else value in choices):
        raise ConfigError(f"{key}: {value!r} is not allowed; choose from {', '.join(choices)}")
    return value


def _parse_scalar(key: str, tp: type, text: str) -> Any:
    import yaml

    if tp is float and text.strip().lower() not in ("null", "none", "~", ""):
        try:  # YAML 1.1 reads "1e-3" as a string
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {text!r} ({exc.problem})") from None


def _type_name(tp: type) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            list: "a list", dict: "a mapping"}.get(tp, tp.__name__)


def _sections(cfg: Config) -> list[str]:
    return [f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "targets":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
