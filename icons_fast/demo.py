"""``icons-fast demo``: the whole pipeline on the generated replica with the built-in LLaVA.

Generates the replica's stage-2 pool (``icons_fast.data.replica``: several
sources of different quality, each record tagged ``source``) and its target
benchmarks, takes the stage-1 base (:func:`stage1_base`, cached), then runs
warmup -> featurize -> influence -> select. Sized for 2 CPU cores.

The stage-1 base is made the way LLaVA makes one: alignment pre-training on
captions that name what each image shows, here of the whole model (vision
tower, projector, language model) because the built-in model starts from
random weights. Without it the model cannot perceive its images, and no
selection of stage-2 data can matter. Image-text matching records stand in for
what LLaVA's CLIP vision tower brings from its contrastive pre-training: telling
whether a text fits the image (without them the full pool stays at chance on
the yes/no existence benchmark).
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
# The stage-1 recipe (alignment pre-training on captions and image-text matching); the cache key
# holds every value.
STAGE1 = {"size": "tiny", "n_captions": 3000, "n_matching": 6000, "epochs": 8, "lr": 3e-3, "batch_size": 16,
          "seed": 0}
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


def _greedy_answers(model_dir: str, records: list, image_folder: str, max_new_tokens: int,
                   max_length: int = 512) -> list[str]:
    """The model's normalised greedy answer to the first turn of each record."""
    from icons_fast.data import ErrorLog
    from icons_fast.data.loader import make_dataset
    from icons_fast.model.loading import load_model
    from icons_fast.train.evaluate import greedy_answer, normalize_answer

    lm = load_model(model_dir, "float32", "cpu")
    dataset, _ = make_dataset(lm, records, image_folder, max_length, ErrorLog(None), stage="data")
    model = lm.model.eval()
    return [normalize_answer(greedy_answer(model, dataset[i], lm.tokenizer, max_new_tokens=max_new_tokens))
            for i in range(len(records))]


def caption_accuracy(model_dir: str, records: list, image_folder: str) -> dict:
    """What the base can do before instruction tuning, on held-out caption records.

    ``exact``: share of greedy captions equal to the truth (after normalisation);
    ``objects``: share of the true ``a <colour> <shape> at the <quadrant>`` phrases
    that the caption contains; ``count``: share whose leading count word is right.
    """
    from icons_fast.train.evaluate import normalize_answer

    exact = objects = n_objects = count = 0
    for pred, rec in zip(_greedy_answers(model_dir, records, image_folder, max_new_tokens=48), records):
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


def matching_accuracy(model_dir: str, records: list, image_folder: str) -> dict:
    """Held-out image-text matching: ``accuracy`` (greedy yes / no against the truth) and ``yes_rate``."""
    from icons_fast.train.evaluate import normalize_answer

    preds = _greedy_answers(model_dir, records, image_folder, max_new_tokens=4)
    gold = [normalize_answer(rec["conversations"][1]["value"]) for rec in records]
    n = max(1, len(records))
    return {"accuracy": sum(p == g for p, g in zip(preds, gold)) / n, "yes_rate": sum(p == "yes" for p in preds) / n,
            "n": len(records)}


def stage1_base(size: str = STAGE1["size"], n_captions: int = STAGE1["n_captions"],
                n_matching: int = STAGE1["n_matching"], epochs: int = STAGE1["epochs"], lr: float = STAGE1["lr"],
                batch_size: int = STAGE1["batch_size"], seed: int = STAGE1["seed"]) -> str:
    """The built-in LLaVA after stage-1 pre-training (cached); returns its model directory.

    Full fine-tune of every parameter on ``n_captions`` generated caption records
    and ``n_matching`` image-text matching records, shuffled together, for
    ``epochs`` epochs; they use their own random streams and images, never the
    stage-2 pool's or the benchmarks'. ``<root>/base_report.json`` holds
    :func:`caption_accuracy` on 64 held-out captions and :func:`matching_accuracy`
    on 64 held-out matching records.
    """
    from icons_fast.data import load_records
    from icons_fast.data.replica import VERSION, make_stage1_data
    from icons_fast.fileio import cache_dir
    from icons_fast.train.finetune import run_train

    root = os.path.join(cache_dir(), f"stage1-v{VERSION}-{size}-n{n_captions}-m{n_matching}-e{epochs}-lr{lr:g}"
                                     f"-b{batch_size}-seed{seed}")
    model_dir = os.path.join(root, "model")
    report = os.path.join(root, "base_report.json")
    if os.path.exists(os.path.join(model_dir, "config.json")) and os.path.exists(report):
        log.info("using the cached stage-1 base %s", model_dir)
        return model_dir
    data = make_stage1_data(os.path.join(root, "data"), n_train=n_captions, n_eval=64, seed=seed + 1000,
                             n_matching=n_matching)
    cfg = Config()
    cfg.override({"model.model": size, "train.full_finetune": True, "train.epochs": epochs, "train.lr": lr,
                  "train.batch_size": batch_size, "data.max_length": 512, "seed": seed})
    cfg.data.image_folder = data["image_folder"]
    log.info("stage 1: pre-training of the %s model on %d captions and %d matching records, %d epochs "
             "(cached for next time)", size, n_captions, n_matching, epochs)
    run_train(cfg, data["train"], root)
    captions = caption_accuracy(model_dir, load_records(data["eval"]), data["image_folder"])
    matching = matching_accuracy(model_dir, load_records(data["matching_eval"]), data["image_folder"])
    log.info("stage-1 base: held-out captions exact %.3f, objects %.3f, count %.3f; matching %.3f (yes %.2f)",
             captions["exact"], captions["objects"], captions["count"], matching["accuracy"], matching["yes_rate"])
    atomic_json(report, {"stage1": {"replica_version": VERSION, "size": size, "n_captions": n_captions,
                                    "n_matching": n_matching, "epochs": epochs, "lr": lr, "batch_size": batch_size,
                                    "seed": seed},
                         "held_out_captions": captions, "held_out_matching": matching})
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
