"""Records -> model-ready samples -> padded batches, with bad samples kept as errors.

``LlavaSampleBuilder.build`` turns one record into tensors (or raises
:class:`SampleProblem`); ``LlavaDataset`` wraps it so ``__getitem__`` never
raises for bad data (it returns a :class:`SampleError` instead, logged once);
``collate`` pads a list of samples into a batch and carries the errors along
under ``"errors"`` so the caller can see every index it was given.

Batch layout (``B`` good samples, ``T`` = longest of them, ``n_img`` of them with images)::

    input_ids       LongTensor[B, T]   right-padded with the pad id
    attention_mask  LongTensor[B, T]   1 on real tokens, 0 on padding
    labels          LongTensor[B, T]   -100 on padding and masked tokens
    pixel_values    FloatTensor[n_img, 3, H, W]   only when n_img > 0, in batch order
    indices         LongTensor[B]      record index in the input file
    ids             list[str]          record ids
    has_image       BoolTensor[B]      which rows own a pixel_values entry
    errors          list[SampleError]  the samples of this batch that are bad

HF LLaVA fills the image-token positions of ``input_ids`` with the image
features in order (row by row), so ``pixel_values`` must hold the images of the
image rows in batch order; text-only rows simply have no image tokens.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from icons_fast.data.conversation import IGNORE_INDEX, tokenize_record
from icons_fast.data.errors import ErrorLog, SampleError, SampleProblem
from icons_fast.data.images import expand_to_square, load_image
from icons_fast.data.records import has_image, record_id

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values")


def image_token_info(model_config, tokenizer=None) -> tuple[int | None, int]:
    """``(image_token_id, image_tokens_per_image)`` from a LLaVA config; ``(None, 0)`` for text-only.

    ``image_seq_length`` is read from the config when present (576 for
    LLaVA-1.5 at 336px); otherwise it is derived from the vision config:
    ``(image_size // patch_size)^2``, plus one for the CLS feature when the
    select strategy is "full".
    """
    if model_config is None or getattr(model_config, "vision_config", None) is None:
        return None, 0
    token_id = getattr(model_config, "image_token_index", None)
    if token_id is None:
        token_id = getattr(model_config, "image_token_id", None)
    if token_id is None and tokenizer is not None:
        token_id = tokenizer.convert_tokens_to_ids("<image>")
    n = getattr(model_config, "image_seq_length", None)
    if n is None:
        v = model_config.vision_config
        n = (v.image_size // v.patch_size) ** 2
        if getattr(model_config, "vision_feature_select_strategy", "default") == "full":
            n += 1
    return int(token_id), int(n)


class LlavaSampleBuilder:
    """Build one model-ready sample from one record.

    Arguments:
        processor_or_tokenizer: a ``LlavaProcessor`` (``.tokenizer`` and
            ``.image_processor``), or a bare tokenizer for text-only models.
        model_config: the model's config (LLaVA: gives the image token id and
            ``image_seq_length``); None or a text-only config: no image support.
        image_folder: folder that the records' ``image`` paths are relative to.
        max_length: longest allowed sequence including image tokens; longer
            records are errors (``too_long``), never truncated. None: no limit.
        pad_to_square: pad images to a square with the processor's mean colour
            before processing, as LLaVA-1.5 training does (``image_aspect_ratio='pad'``).
    """

    def __init__(self, processor_or_tokenizer, model_config=None, image_folder: str | None = None,
                 max_length: int | None = 2048, pad_to_square: bool = True):
        self.tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
        self.image_processor = getattr(processor_or_tokenizer, "image_processor", None)
        token_id, n = image_token_info(model_config, self.tokenizer)
        if self.image_processor is None:
            token_id, n = None, 0
        self.image_token_id = token_id
        self.n_image_tokens = n
        self.image_folder = image_folder
        self.max_length = max_length
        self.pad_to_square = pad_to_square
        tok = self.tokenizer
        self.pad_token_id = next(
            (t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0
        )

    @property
    def supports_images(self) -> bool:
        return self.image_token_id is not None

    def _pixels(self, rel_path: str) -> torch.Tensor:
        img = load_image(self.image_folder, rel_path)
        if self.pad_to_square:
            mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
            img = expand_to_square(img, tuple(int(round(255 * m)) for m in mean))
        out = self.image_processor(images=img, return_tensors="pt")["pixel_values"]
        return out[0]  # (3, H, W)

    def build(self, index: int, record) -> dict:
        """``dict(index, id, input_ids[T], labels[T], pixel_values[3, H, W] or None)``.

        Raises :class:`SampleProblem` (conversation problems first, then image ones).
        """
        input_ids, labels = tokenize_record(
            record, self.tokenizer, self.image_token_id, self.n_image_tokens, self.max_length
        )
        pixel_values = self._pixels(record["image"]) if has_image(record) else None
        return dict(index=int(index), id=record_id(record, index), input_ids=input_ids, labels=labels,
                    pixel_values=pixel_values)

    def collate(self, samples: list) -> dict:
        """:func:`collate` with this builder's pad id."""
        return collate(samples, pad_token_id=self.pad_token_id)


class LlavaDataset(Dataset):
    """Torch dataset over ``records`` (optionally a subset ``indices`` of them).

    ``dataset[i]`` builds record ``indices[i]`` (``i`` itself by default) and
    returns the sample dict, or a :class:`SampleError` for a bad record (also
    added to ``error_log``). It never raises for bad data.

    With DataLoader workers the error log in each worker is a copy: the file
    still receives every line, and the caller should also
    ``error_log.add_many(batch["errors"])`` in the main process (de-duplicated).
    """

    def __init__(self, records: list, builder: LlavaSampleBuilder, error_log: ErrorLog | None = None,
                 stage: str = "tokenize", indices=None):
        self.records = records
        self.builder = builder
        self.error_log = error_log
        self.stage = stage
        self.indices = list(range(len(records))) if indices is None else [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        record = self.records[index]
        try:
            return self.builder.build(index, record)
        except SampleProblem as problem:
            err = SampleError(index, record_id(record, index), self.stage, problem.reason)
            if self.error_log is not None:
                self.error_log.add(err)
            return err


def collate(samples: list, pad_token_id: int = 0) -> dict:
    """Pad samples into a batch (layout in the module docstring); errors go under ``"errors"``.

    ``pad_token_id`` only fills padded ``input_ids`` (masked by ``attention_mask``
    and labelled -100), so any valid id works; use the tokenizer's pad id.
    """
    errors = [s for s in samples if isinstance(s, SampleError)]
    good = [s for s in samples if not isinstance(s, SampleError)]
    B = len(good)
    T = max((len(s["input_ids"]) for s in good), default=0)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(good):
        n = len(s["input_ids"])
        input_ids[b, :n] = s["input_ids"]
        labels[b, :n] = s["labels"]
        attention_mask[b, :n] = 1
    images = [s["pixel_values"] for s in good if s["pixel_values"] is not None]
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        indices=torch.tensor([s["index"] for s in good], dtype=torch.long),
        ids=[s["id"] for s in good],
        has_image=torch.tensor([s["pixel_values"] is not None for s in good], dtype=torch.bool),
        errors=errors,
    )
    if images:
        batch["pixel_values"] = torch.stack(images)  # (n_img, 3, H, W), batch order
    return batch


def model_kwargs(batch: dict) -> dict:
    """The keyword arguments for ``model(**kwargs)``: input_ids, attention_mask, labels, pixel_values if any."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}
