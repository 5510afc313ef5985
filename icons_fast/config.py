"""The one configuration object of icons-fast.

``Config`` groups every setting of the pipeline in dataclass sections. It is
loaded from YAML or JSON (``Config.load``), overridden from the command line
(``config.override({"features.proj_dim": 8192})``), and written with its
fingerprint into every run directory (``config.save``), so a rerun can tell
whether earlier outputs were made under the same settings.

Stage fingerprints (``Config.fingerprint(*sections)``) hash only the sections a
stage depends on, so changing the selection budget does not invalidate the
features.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class DataConfig:
    train_data: str | None = None  # LLaVA json list of records
    image_folder: str | None = None  # images are resolved relative to this folder
    targets: dict[str, str] = field(default_factory=dict)  # task name (or task/subtask) -> target json
    target_image_folder: str | None = None  # images of the target sets; defaults to image_folder
    max_length: int = 2048  # samples longer than this (in tokens) are recorded and excluded


@dataclass
class ModelConfig:
    model: str = "tiny"  # "tiny", a llava-hf directory or a causal-LM directory
    dtype: str = "float32"  # float32 | bfloat16 | float16
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LLAMA_LORA_TARGETS))


@dataclass
class WarmupConfig:
    fraction: float = 0.05  # seeded random fraction of the pool used for warmup
    epochs: int = 1
    lr: float = 2e-4
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 4
    num_checkpoints: int = 1  # checkpoints spread evenly over the run, last one at the end


@dataclass
class TrainConfig:
    """Fine-tuning on a (selected) subset: ``icons-fast train``."""

    epochs: int = 1
    lr: float = 2e-4
    batch_size: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    full_finetune: bool = False  # train every parameter (used to pre-train the tiny base)


@dataclass
class FeatureConfig:
    proj_dim: int = 5120
    seed: int = 0
    train_mode: str = "adam"  # adam (LESS) | sgd (released ICONS code)
    target_mode: str = "sgd"
    backend: str = "auto"
    batch_size: int = 8
    shard_size: int = 4096  # samples per feature shard
    store_dtype: str = "float16"


@dataclass
class SelectConfig:
    budget: float = 0.2  # fraction of the pool (or an integer count when >= 1)
    top_percent: float | None = None  # per-task vote threshold; defaults to the budget's percentage
    aggregate: str = "mean"  # mean | max | topm:<m>
    tie_break: str = "mean_rank"  # mean_rank | index | random
    rule: str = "icons"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    seed: int = 0
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    out: str = "runs/icons"

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
        """Load a YAML (.yaml/.yml) or JSON config; unknown keys raise."""
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                d = yaml.safe_load(f) or {}
            else:
                d = json.load(f)
        if "fingerprint" in d and "config" in d:  # a saved run config
            d = d["config"]
        return cls.from_dict(d)

    def save(self, run_dir: str) -> str:
        """Write ``run_dir/config.json`` (resolved config + fingerprint) atomically."""
        from icons_fast.fileio import atomic_json

        payload = {"fingerprint": self.fingerprint(), "config": self.to_dict()}
        return atomic_json(os.path.join(run_dir, "config.json"), payload, sort_keys=True)

    # ------------------------------------------------------------ overrides
    def override(self, updates: dict[str, Any]) -> "Config":
        """Set dotted keys, e.g. ``{"features.proj_dim": 8192, "seed": 1}``.

        String values are parsed as YAML scalars ("8192" -> 8192, "true" -> True)
        when the field is not a string. Unknown keys raise ``KeyError`` naming
        the valid ones.
        """
        for key, value in updates.items():
            if value is None:
                continue
            obj = self
            parts = key.split(".")
            for p in parts[:-1]:
                if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
                    raise KeyError(f"unknown config section {p!r} in {key!r}; sections: {_sections(self)}")
                obj = getattr(obj, p)
            name = parts[-1]
            names = [f.name for f in dataclasses.fields(obj)]
            if name not in names:
                raise KeyError(f"unknown config key {key!r}; valid keys here: {names}")
            current = getattr(obj, name)
            setattr(obj, name, _coerce(value, current))
        return self

    # ---------------------------------------------------------- fingerprint
    def fingerprint(self, *sections: str) -> str:
        """sha256 (16 hex chars) of the named sections (all of them when none)."""
        d = self.to_dict()
        if sections:
            d = {s: d[s] for s in sections}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


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


def _coerce(value: Any, current: Any) -> Any:
    if isinstance(value, str) and not isinstance(current, str):
        import yaml

        if isinstance(current, float) or current is None:
            try:  # YAML 1.1 reads "1e-3" as a string
                return float(value) if isinstance(current, float) else yaml.safe_load(value)
            except ValueError:
                raise ValueError(f"expected a number, got {value!r}") from None
        value = yaml.safe_load(value)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value
