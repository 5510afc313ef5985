"""``icons-fast demo``: the whole pipeline on generated data with the tiny LLaVA.

Generates the embedded demo pool (rendered shapes, several visual QA tasks, a
text-only task, near-duplicates and label noise) and its target sets, then
runs warmup -> featurize -> influence -> select. Sized for 2 CPU cores.
"""
from __future__ import annotations

import os

from icons_fast.config import Config

# Settings that fit the tiny model (hidden size 64) and a 2-core CPU.
DEMO_OVERRIDES = {
    "model.model": "tiny",
    "model.lora_r": 8,
    "model.lora_alpha": 16,
    "warmup.fraction": 0.1,
    "warmup.epochs": 2,
    "warmup.lr": 1e-3,
    "warmup.batch_size": 8,
    "features.proj_dim": 1024,
    "features.batch_size": 16,
    "features.shard_size": 256,
    "data.max_length": 512,
}


def demo_config(base: Config | None, data: dict, out: str) -> Config:
    cfg = base or Config()
    defaults = Config()
    # Demo settings apply where the user did not set something else.
    for key, value in DEMO_OVERRIDES.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) == getattr(getattr(defaults, section), name):
            cfg.override({key: value})
    cfg.data.train_data = cfg.data.train_data or data["train"]
    cfg.data.image_folder = cfg.data.image_folder or data["image_folder"]
    cfg.data.targets = cfg.data.targets or dict(data["targets"])
    cfg.out = out
    return cfg


def pretrained_demo_base(size: str = "tiny", n_samples: int = 800, epochs: int = 8, seed: int = 0) -> str:
    """A tiny LLaVA fully fine-tuned on separately generated demo data (cached).

    A randomly initialised model gives gradients that say little about the
    tasks; ICONS warms up LoRA on a pre-trained model, so the demo does too.
    The pre-training data uses another seed than the demo pool and targets.
    """
    from icons_fast.data.demo import make_demo_data
    from icons_fast.model.loading import default_cache_dir
    from icons_fast.train.finetune import run_train

    root = os.path.join(default_cache_dir(), f"demo-base-{size}-n{n_samples}-e{epochs}-lr3e-3-seed{seed}")
    model_dir = os.path.join(root, "model")
    if os.path.exists(os.path.join(model_dir, "config.json")):
        print(f"[demo] using the cached pre-trained base {model_dir}")
        return model_dir
    data = make_demo_data(os.path.join(root, "data"), n_train=n_samples, seed=seed + 1000, n_target=1, n_eval=1)
    cfg = Config()
    cfg.override({"model.model": size, "train.full_finetune": True, "train.epochs": epochs, "train.lr": 3e-3,
                  "train.batch_size": 16, "data.max_length": 512, "seed": seed})
    cfg.data.image_folder = data["image_folder"]
    print(f"[demo] pre-training the {size} base on {n_samples} generated samples (cached for next time)")
    return run_train(cfg, data["train"], root)


def run_demo(cfg: Config | None = None, quick: bool = False) -> dict:
    """Generate the demo data under ``<out>/data``, pre-train the base (cached), run the pipeline into ``<out>``."""
    from icons_fast.data.demo import make_demo_data
    from icons_fast.stages.pipeline import run

    out = cfg.out if cfg is not None and cfg.out != Config().out else "runs/demo"
    data = make_demo_data(os.path.join(out, "data"), n_train=120 if quick else 600, seed=0)
    user_model = cfg is not None and cfg.model.model != Config().model.model
    cfg = demo_config(cfg, data, out)
    if not user_model and not quick:
        cfg.model.model = pretrained_demo_base()
    print(f"[demo] pool {cfg.data.train_data}, {len(cfg.data.targets)} target task(s), out {out}")
    return run(cfg)
