"""``icons-fast demo``: the whole pipeline on the generated replica with the built-in LLaVA.

Generates the replica's stage-2 pool (``icons_fast.data.replica``: several
sources of different quality, each record tagged ``source``) and its target
benchmarks, takes the stage-1 base (:func:`stage1_base`, cached), then runs
warmup -> featurize -> influence -> select. Sized for 2 CPU cores.

The stage-1 base is made the way LLaVA makes one: alignment pre-training on
captions that name what each image shows, here of the whole model (vision
tower, projector, language model) because the built-in model starts from
random weights. Without it the model cannot perceive its images, and no
selection of stage-2 data can matter.
"""
from __future__ import annotations

import logging
import os

from icons_fast.config import Config
from icons_fast.fileio import atomic_json

log = logging.getLogger(__name__)

# Settings that fit the built-in model and a 2-core CPU.
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
# The stage-1 recipe (alignment pre-training on captions); the cache key holds every value.
STAGE1 = {"size": "tiny", "n_captions": 3000, "epochs": 8, "lr": 3e-3, "batch_size": 16, "seed": 0}
DEMO_POOL = 600


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


def caption_accuracy(model_dir: str, records: list, image_folder: str, max_length: int = 512) -> dict:
    """What the base can do before instruction tuning, on held-out caption records.

    ``exact``: share of greedy captions equal to the truth (after normalisation);
    ``objects``: share of the true ``a <colour> <shape> at the <quadrant>`` phrases
    that the caption contains; ``count``: share whose leading count word is right.
    """
    from icons_fast.data import ErrorLog
    from icons_fast.data.loader import make_dataset
    from icons_fast.model.loading import load_model
    from icons_fast.train.evaluate import greedy_answer, normalize_answer

    lm = load_model(model_dir, "float32", "cpu")
    dataset, _ = make_dataset(lm, records, image_folder, max_length, ErrorLog(None), stage="data")
    model = lm.model.eval()
    exact = objects = n_objects = count = 0
    for i, rec in enumerate(records):
        pred = normalize_answer(greedy_answer(model, dataset[i], lm.tokenizer, max_new_tokens=48))
        gold = normalize_answer(rec["conversations"][1]["value"])
        exact += pred == gold
        head, _, body = gold.partition(": ")
        phrases = body.split(", ")
        got = set(pred.partition(": ")[2].split(", "))
        objects += sum(p in got for p in phrases)
        n_objects += len(phrases)
        count += pred.partition(": ")[0] == head
    n = max(1, len(records))
    return {"exact": exact / n, "objects": objects / max(1, n_objects), "count": count / n, "n": len(records)}


def stage1_base(size: str = STAGE1["size"], n_captions: int = STAGE1["n_captions"], epochs: int = STAGE1["epochs"],
                lr: float = STAGE1["lr"], batch_size: int = STAGE1["batch_size"], seed: int = STAGE1["seed"]) -> str:
    """The built-in LLaVA after stage-1 caption pre-training (cached); returns its model directory.

    Full fine-tune of every parameter on ``n_captions`` generated caption records
    for ``epochs`` epochs; the captions use their own random stream and images,
    never the stage-2 pool's or the benchmarks'. ``<root>/base_report.json``
    holds :func:`caption_accuracy` on 64 held-out captions.
    """
    from icons_fast.data import load_records
    from icons_fast.data.replica import VERSION, make_caption_data
    from icons_fast.fileio import cache_dir
    from icons_fast.train.finetune import run_train

    root = os.path.join(cache_dir(),
                        f"stage1-v{VERSION}-{size}-n{n_captions}-e{epochs}-lr{lr:g}-b{batch_size}-seed{seed}")
    model_dir = os.path.join(root, "model")
    report = os.path.join(root, "base_report.json")
    if os.path.exists(os.path.join(model_dir, "config.json")) and os.path.exists(report):
        log.info("using the cached stage-1 base %s", model_dir)
        return model_dir
    data = make_caption_data(os.path.join(root, "data"), n_train=n_captions, n_eval=64, seed=seed + 1000)
    cfg = Config()
    cfg.override({"model.model": size, "train.full_finetune": True, "train.epochs": epochs, "train.lr": lr,
                  "train.batch_size": batch_size, "data.max_length": 512, "seed": seed})
    cfg.data.image_folder = data["image_folder"]
    log.info("stage 1: caption pre-training of the %s model on %d captions, %d epochs (cached for next time)",
             size, n_captions, epochs)
    run_train(cfg, data["train"], root)
    acc = caption_accuracy(model_dir, load_records(data["eval"]), data["image_folder"])
    log.info("stage-1 base: held-out captions exact %.3f, objects %.3f, count %.3f",
             acc["exact"], acc["objects"], acc["count"])
    atomic_json(report, {"stage1": {"replica_version": VERSION, "size": size, "n_captions": n_captions,
                                    "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed},
                         "held_out_captions": acc})
    return model_dir


def run_demo(cfg: Config | None = None, quick: bool = False) -> dict:
    """Generate the replica under ``<out>/data``, take the stage-1 base (cached), run the pipeline into ``<out>``."""
    from icons_fast.data.replica import make_replica_data
    from icons_fast.stages.pipeline import run

    out = cfg.out if cfg is not None and cfg.out != Config().out else "runs/demo"
    data = make_replica_data(os.path.join(out, "data"), n_train=120 if quick else DEMO_POOL, seed=0)
    user_model = cfg is not None and cfg.model.model != Config().model.model
    cfg = demo_config(cfg, data, out)
    if not user_model and not quick:
        cfg.model.model = stage1_base()
    log.info("demo pool %s, %d target benchmark(s), out %s", cfg.data.train_data, len(cfg.data.targets), out)
    return run(cfg)
