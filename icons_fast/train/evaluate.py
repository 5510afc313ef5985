"""``icons-fast evaluate``: per-task accuracy and mean answer loss.

Accuracy: the greedy short answer to each record's first question, generated
from the same prompt tokens the training template builds, compared with the
record's first answer after normalisation (case, surrounding whitespace and
punctuation, inner whitespace runs). Answer loss: the mean over records of
the per-sample answer cross-entropy (all answer turns), as in featurize.
"""
from __future__ import annotations

import logging
import os
import re

import torch
from tqdm.auto import tqdm

from icons_fast.config import Config

log = logging.getLogger(__name__)


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip surrounding whitespace and punctuation."""
    text = re.sub(r"\s+", " ", text.lower()).strip()
    return text.strip(" .,!?;:\"'")


@torch.no_grad()
def greedy_answer(model, sample: dict, tokenizer, max_new_tokens: int = 12) -> str:
    """Greedy decode after the prompt of ``sample`` (its tokens before the first labelled token)."""
    labels = sample["labels"]
    first = int((labels != -100).nonzero()[0])
    ids = sample["input_ids"][:first][None].to(next(model.parameters()).device)
    dtype = next(model.parameters()).dtype
    kwargs = {k: v.to(ids.device, dtype if v.is_floating_point() else v.dtype)
              for k, v in (sample.get("image_inputs") or {}).items()}  # each family's image tensors
    if "mm_token_type_ids" in sample:  # Qwen2-VL: the prompt's image-token types (multimodal positions)
        kwargs["mm_token_type_ids"] = sample["mm_token_type_ids"][:first][None].to(ids.device)
    eos = tokenizer.eos_token_id
    out = []
    past = None
    for _ in range(max_new_tokens):
        res = model(input_ids=ids, past_key_values=past, use_cache=True, **kwargs)
        past = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        ids = torch.tensor([[nxt]], device=ids.device)
        kwargs = {}  # the image is in the cache after the first step
    return tokenizer.decode(out, skip_special_tokens=True)


def evaluate_task(lm, records: list, image_folder: str | None, max_length: int, batch_size: int = 16) -> dict:
    """Accuracy and mean answer loss of ``lm`` on ``records``; bad records are counted, not scored."""
    from icons_fast.data import ErrorLog
    from icons_fast.data.loader import make_dataset
    from icons_fast.model.inputs import MODEL_INPUT_KEYS, per_sample_losses

    errors = ErrorLog(None)
    dataset, collate = make_dataset(lm, records, image_folder, max_length, errors, stage="data")
    model = lm.model.eval()
    device = next(model.parameters()).device
    correct, losses, n = 0, [], 0
    samples = [dataset[i] for i in range(len(dataset))]
    good = [s for s in samples if isinstance(s, dict)]
    for s in tqdm(good, desc="evaluate", unit="sample", leave=False):
        pred = greedy_answer(model, s, lm.tokenizer)
        gold = records[s["index"]]["conversations"][1]["value"]
        correct += int(normalize_answer(pred) == normalize_answer(gold))
        n += 1
    for b0 in range(0, len(good), batch_size):
        batch = collate(good[b0 : b0 + batch_size])
        kw = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUT_KEYS and torch.is_tensor(v)}
        with torch.no_grad():
            logits = model(**kw, use_cache=False).logits
        losses.append(per_sample_losses(logits, batch["labels"].to(device)).cpu())
    loss = torch.cat(losses).mean().item() if losses else float("nan")
    return {"accuracy": correct / n if n else float("nan"), "answer_loss": loss, "n": n, "excluded": len(errors)}


def run_evaluate(cfg: Config, model_dir: str, targets: dict[str, str], json_out: str | None = None) -> dict:
    """Evaluate ``model_dir`` on every task file in ``targets``; write ``json_out`` when given."""
    from icons_fast.data import load_records
    from icons_fast.model.loading import load_model

    lm = load_model(model_dir, cfg.model.dtype, cfg.resolved_device())
    results = {}
    for task, path in targets.items():
        results[task] = evaluate_task(lm, load_records(path), cfg.data.image_folder, cfg.data.max_length)
        log.debug("%s: %s", task, results[task])
    if json_out:
        from icons_fast.fileio import atomic_json

        atomic_json(json_out, {"model": os.path.abspath(model_dir), "tasks": results})
    return results


def format_results(results: dict) -> str:
    """One line per task of ``run_evaluate``'s results: accuracy, answer loss and the number of samples."""
    return "\n".join(f"{task:<12s} accuracy {r['accuracy']:.3f}  answer loss {r['answer_loss']:.3f}  (n={r['n']})"
                     for task, r in results.items())
