"""Does the selection work? A small-scale replica of the paper's table on the demo data.

For each seed: select 20% of the demo pool with the ICONS pipeline (warmup ->
featurize -> influence -> vote) from the same pre-trained tiny base, then
LoRA fine-tune that base on the full pool, a random 20%, the ICONS 20%, the
LESS-rule 20% and the mean / max cross-task aggregates at 20%, and evaluate
every model on every task's held-out set. Relative performance of a subset
is the paper's: the mean over tasks of accuracy / full-pool accuracy x 100.

    python benchmarks/quality.py --seeds 0 1 2 --out runs/quality

Prints the per-task table (mean +- std over seeds) and writes
``quality.json`` and ``quality.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from icons_fast.config import Config  # noqa: E402
from icons_fast.data import load_records, make_demo_data, save_records  # noqa: E402

CONDITIONS = ("full", "random", "icons", "less", "mean", "max")


def selection_for(rule: str, run_dir: str, budget: float, seed: int) -> np.ndarray:
    """Indices chosen by ``rule`` from the run's influence scores (``random``: seeded uniform over valid samples)."""
    from icons_fast.select.rules import select_by_rule
    from icons_fast.stages.influence import load_scores

    scores, names, valid = load_scores(run_dir)
    return np.sort(np.asarray(select_by_rule(rule, scores, names, budget, valid, seed, run_dir=run_dir)))


def train_and_eval(base: str, data: dict, subset: list, out: str, seed: int, epochs: int) -> dict:
    from icons_fast.train.evaluate import run_evaluate
    from icons_fast.train.finetune import run_train

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "subset.json")
    save_records(subset, path)
    cfg = Config()
    cfg.override({"model.model": base, "model.lora_r": 8, "model.lora_alpha": 16, "train.epochs": epochs,
                  "train.lr": 3e-3, "train.batch_size": 8, "data.max_length": 512, "seed": seed})
    cfg.data.image_folder = data["image_folder"]
    model_dir = run_train(cfg, path, out)
    return run_evaluate(cfg, model_dir, data["eval"], json_out=os.path.join(out, "eval.json"))


def run_seed(seed: int, out: str, data: dict, base: str, epochs: int, budget: float) -> dict:
    from icons_fast.demo import demo_config
    from icons_fast.stages.pipeline import run

    run_dir = os.path.join(out, f"seed{seed}", "select")
    cfg = demo_config(None, data, run_dir)
    cfg.model.model = base
    cfg.seed = seed
    cfg.features.seed = seed
    cfg.select.budget = budget
    t = time.perf_counter()
    run(cfg)
    select_s = time.perf_counter() - t
    pool = load_records(data["train"])
    results = {"select_seconds": select_s, "accuracy": {}, "answer_loss": {}, "sizes": {}}
    for cond in CONDITIONS:
        if cond == "full":
            idx = np.arange(len(pool))
        else:
            idx = selection_for(cond, run_dir, budget, seed)
        results["sizes"][cond] = int(len(idx))
        res = train_and_eval(base, data, [pool[i] for i in idx], os.path.join(out, f"seed{seed}", cond), seed, epochs)
        results["accuracy"][cond] = {t: r["accuracy"] for t, r in res.items()}
        results["answer_loss"][cond] = {t: r["answer_loss"] for t, r in res.items()}
        print(f"[quality] seed {seed} {cond:<7s} n={len(idx):4d} " +
              " ".join(f"{t}={r['accuracy']:.3f}/{r['answer_loss']:.3f}" for t, r in res.items()), flush=True)
    return results


def relative(score: dict, full: dict, lower_is_better: bool = False) -> float:
    """The paper's relative performance: mean over tasks of score / full x 100.

    For a loss (lower is better) the ratio is inverted, full / score x 100, so
    100 still means "as good as the full pool". Tasks where the full model
    scores 0 are skipped.
    """
    if lower_is_better:
        ratios = [full[t] / score[t] * 100 for t in full if score[t] > 0]
    else:
        ratios = [score[t] / full[t] * 100 for t in full if full[t] > 0]
    return float(np.mean(ratios)) if ratios else float("nan")


def table(per_seed: dict, tasks: list, metric: str) -> str:
    """Per-task mean ± std over seeds of ``metric`` ("accuracy" or "answer_loss"), and relative performance."""
    lower = metric == "answer_loss"
    lines = [f"| subset ({metric}) | " + " | ".join(tasks) + " | relative % |", "|---" * (len(tasks) + 2) + "|"]
    for cond in CONDITIONS:
        vals = np.array([[r[metric][cond][t] for t in tasks] for r in per_seed.values()])
        rel = np.array([relative(r[metric][cond], r[metric]["full"], lower) for r in per_seed.values()])
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(vals.mean(0), vals.std(0))]
        lines.append(f"| {cond} | " + " | ".join(cells) + f" | {rel.mean():.1f} ± {rel.std():.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs, the same for every subset")
    ap.add_argument("--budget", type=float, default=0.2)
    args = ap.parse_args(argv)
    from icons_fast.demo import pretrained_demo_base

    data = make_demo_data(os.path.join(args.out, "data"), n_train=args.n_train, seed=0)
    base = pretrained_demo_base()
    t0 = time.perf_counter()
    per_seed = {s: run_seed(s, args.out, data, base, args.epochs, args.budget) for s in args.seeds}
    tasks = list(data["eval"])
    md = table(per_seed, tasks, "accuracy") + "\n\n" + table(per_seed, tasks, "answer_loss")
    print(md)
    header = (f"demo pool n={args.n_train} (15% near-duplicates, 15% label noise), budget {args.budget:.0%}, "
              f"seeds {args.seeds}, LoRA r=8 lr 3e-3 fine-tune {args.epochs} epoch(s) from the pre-trained tiny base, "
              f"accuracy = exact match, answer loss = mean answer cross-entropy, on 48 held-out samples per task; "
              f"{time.perf_counter() - t0:.0f} s in all")
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(header + "\n\n" + md + "\n")
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"config": vars(args), "per_seed": per_seed}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
