"""Records -> model-ready samples -> padded batches, with bad samples kept as errors.

``LlavaSampleBuilder.build`` turns one record into tensors (or raises
:class:`SampleProblem`); ``LlavaDataset`` wraps it so ``__getitem__`` never
raises for bad data (it returns a :class:`SampleError` instead, logged once);
``collate`` pads a list of samples into a batch and carries the errors along
under ``"errors"`` so the caller can see every index it was given.

Batch layout (``B`` good samples, ``T`` = longest of them, ``n_img`` images in them, in batch
and text order; a sample may hold several images where ``max_images`` allows)::

    input_ids       LongTensor[B, T]   right-padded with the pad id
    attention_mask  LongTensor[B, T]   1 on real tokens, 0 on padding
    labels          LongTensor[B, T]   -100 on padding and masked tokens
    pixel_values    the batch's images, in batch order (only when n_img > 0):
                      llava            FloatTensor[n_img, 3, H, W]
                      qwen2_vl         FloatTensor[sum of patches, C*t*p*p] (concatenated, not stacked)
                      llava_next/_ov   FloatTensor[n_img, max tiles, 3, H, W] (tiles zero-padded)
                      idefics3         FloatTensor[n_img, max crops, 3, H, W] (crops zero-padded)
    image_grid_thw  LongTensor[n_img, 3]   qwen2_vl: patch grid (t, h, w) of each image
    mm_token_type_ids  LongTensor[B, T]    qwen2_vl: 1 on image tokens, 0 elsewhere (the model's
                                           multimodal rotary positions are built from it)
    image_sizes     LongTensor[n_img, 2]   llava_next/_ov: each image's (height, width)
    pixel_attention_mask  BoolTensor[n_img, max crops, H, W]   idefics3
    indices         LongTensor[B]      record index in the input file
    ids             list[str]          record ids
    has_image       BoolTensor[B]      which rows own an image (one or more)
    image_inputs    list[dict | None]  each row's own image tensors (what ``batch_rows`` re-batches)
    errors          list[SampleError]  the samples of this batch that are bad

Every family's model fills the image-token positions of ``input_ids`` with the
image features in order (row by row, image by image), so the image tensors hold
the images of the image rows in batch order; text-only rows simply have no image tokens. One
rule batches every family's image tensors: each sample's tensors have a leading
image (or patch) axis; the other axes are zero-padded to the batch's largest
and the samples concatenated along the leading axis (:func:`concat_image_inputs`).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from icons_fast.data.conversation import (
    IGNORE_INDEX,
    conversation_pairs,
    resolve_template,
    template_renderer,
    tokenize_chat,
    tokenize_record,
)
from icons_fast.data.errors import ErrorLog, SampleError, SampleProblem
from icons_fast.data.images import expand_to_square, load_image
from icons_fast.data.records import has_image, image_list, record_id

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "image_sizes",
              "pixel_attention_mask", "mm_token_type_ids")
TOKEN_KEYS = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")  # [B, T] batch keys
IMAGE_FAMILIES = ("llava", "qwen2_vl", "llava_next", "llava_onevision", "idefics3")
# Families whose models take several images in one sample: each image's tokens are filled with its
# own features in order. LLaVA-1.5 takes one; LLaVA-OneVision switches to another image layout
# (no any-resolution tiles) when a sample has several, which the token count here does not follow.
MULTI_IMAGE_FAMILIES = ("qwen2_vl", "llava_next", "idefics3")


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
    v = model_config.vision_config
    if n is None and not hasattr(v, "image_size"):  # dynamic resolution: counted per image by the builder
        n = 0
    if n is None:
        n = (v.image_size // v.patch_size) ** 2
        if getattr(model_config, "vision_feature_select_strategy", "default") == "full":
            n += 1
    return int(token_id), int(n)


def anyres_image_tokens(image_hw: tuple[int, int], tile_hw: tuple[int, int], side: int, pinpoints,
                        cls_token: bool, drop_first: bool, max_tiles: int | None = None) -> int:
    """Image tokens of one LLaVA-NeXT / LLaVA-OneVision any-resolution image.

    The image (``image_hw`` = original height, width) is resized into the
    pinpoint grid that fits it best (``select_best_resolution``), cut into tiles
    of ``tile_hw``, and each tile gives ``side x side`` features. The grid's
    features are unpadded back to the image's aspect ratio (the rows or columns
    that only covered padding are dropped), a newline feature ends each row,
    and the base tile (the whole image at tile size) adds ``side**2`` (+1 for a
    CLS feature, ``cls_token``; -1 under the "default" select strategy,
    ``drop_first``). OneVision (``max_tiles``, its ``anyres_max_N``) shrinks a grid
    of more than ``~1.1**2 * N`` tiles' features by the square root of the excess.
    """
    import math

    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution(list(image_hw), pinpoints)
    h, w = side * (best_h // tile_hw[0]), side * (best_w // tile_hw[1])
    orig_h, orig_w = image_hw
    if orig_w / orig_h > w / h:  # wider than the grid: padding rows at the top and bottom
        kept = int(round(orig_h * (w / orig_w), 7))
        h -= 2 * ((h - kept) // 2)
    else:  # taller (or equal): padding columns left and right
        kept = int(round(orig_w * (h / orig_h), 7))
        w -= 2 * ((w - kept) // 2)
    features = h * w + h
    if max_tiles is not None:
        ratio = math.sqrt(h * w / (max_tiles * side**2))
        if ratio > 1.1:
            features = int(h // ratio) * int(w // ratio) + int(h // ratio)
    return features + side**2 + int(cls_token) - int(drop_first)


def _max_tiles(aspect: str | None) -> int | None:
    """``anyres_max_9`` -> 9 (LLaVA-OneVision's ``vision_aspect_ratio``); None for plain ``anyres``."""
    if aspect and aspect.startswith("anyres_max_"):
        return int(aspect[len("anyres_max_"):])
    return None


class LlavaSampleBuilder:
    """Build one model-ready sample from one record.

    Arguments:
        processor_or_tokenizer: a processor (``.tokenizer`` and ``.image_processor``),
            or a bare tokenizer for text-only models.
        model_config: the model's config (gives the image token id and, for
            LLaVA-1.5, ``image_seq_length``); None or a text-only config: no image support.
        image_folder: folder that the records' ``image`` paths are relative to.
        max_length: longest allowed sequence including image tokens; longer
            records are errors (``too_long``), never truncated. None: no limit.
        pad_to_square: pad images to a square with the processor's mean colour
            before processing, as LLaVA-1.5 training does (``image_aspect_ratio='pad'``).
        template: ``auto`` | ``vicuna_v1`` | ``chat`` (see ``conversation.resolve_template``).
        family: ``llava`` | ``qwen2_vl`` | ``llava_next`` | ``llava_onevision`` |
            ``idefics3`` | ``causal_lm``; None: ``llava`` when ``model_config`` has a
            vision part, else ``causal_lm``.
        chat_template: the model's chat template (jinja), None when it has none.

    ``max_images``: the most images one sample may have (None: no limit, the
    families of :data:`MULTI_IMAGE_FAMILIES`; 1 otherwise); a record with more
    is refused as ``multiple_images`` by ``formats.CheckedBuilder``.
    """

    def __init__(self, processor_or_tokenizer, model_config=None, image_folder: str | None = None,
                 max_length: int | None = 2048, pad_to_square: bool = True, template: str = "vicuna_v1",
                 family: str | None = None, chat_template: str | None = None):
        self.processor = processor_or_tokenizer
        self.model_config = model_config
        self.tokenizer = getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)
        self.image_processor = getattr(processor_or_tokenizer, "image_processor", None)
        has_vision = getattr(model_config, "vision_config", None) is not None
        self.family = family or ("llava" if has_vision else "causal_lm")
        self.max_images = None if self.family in MULTI_IMAGE_FAMILIES else 1
        token_id, n = image_token_info(model_config, self.tokenizer)
        if self.image_processor is None:
            token_id, n = None, 0
        self.image_token_id = token_id
        self.n_image_tokens = n
        self.image_folder = image_folder
        self.max_length = max_length
        self.pad_to_square = pad_to_square and self.family == "llava"
        self.template = resolve_template(template, self.family, chat_template)
        if self.template == "vicuna_v1" and self.family not in ("llava", "causal_lm"):
            raise ValueError(f"vicuna_v1 is the LLaVA-1.5 template; a {self.family} model needs its own "
                             f"(--template chat or auto)")
        if self.supports_images and self.family == "idefics3" and not callable(processor_or_tokenizer):
            raise ValueError("Idefics3/SmolVLM images are expanded by the model's own processor, which could not be "
                             "loaded (SmolVLM's also builds a video processor: install torchvision matching torch)")
        if self.supports_images and self.family not in IMAGE_FAMILIES:
            raise ValueError(f"no image batching rule for family {self.family!r}; known: {', '.join(IMAGE_FAMILIES)}")
        self.render = template_renderer(self.tokenizer, chat_template) if self.template == "chat" else None
        self.image_token = self.tokenizer.convert_ids_to_tokens(token_id) if token_id is not None else None
        tok = self.tokenizer
        self.pad_token_id = next(
            (t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0
        )

    @property
    def supports_images(self) -> bool:
        return self.image_token_id is not None

    def _pixels(self, rel_path: str) -> torch.Tensor:
        """LLaVA-1.5: the image padded to a square and resized, ``[3, H, W]``."""
        img = load_image(self.image_folder, rel_path)
        if self.pad_to_square:
            mean = getattr(self.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
            img = expand_to_square(img, tuple(int(round(255 * m)) for m in mean))
        out = self.image_processor(images=img, return_tensors="pt")["pixel_values"]
        return out[0]  # (3, H, W)

    def _image(self, rel_path: str) -> tuple[list[int], dict]:
        """``(ids that replace the image token, the image's tensors with a leading image axis)``.

        The number of image tokens depends on the image for every family but
        LLaVA-1.5: Qwen2-VL has one token per merged patch group
        (``prod(image_grid_thw) / merge_size**2``); LLaVA-NeXT/OneVision count the
        tiles' features after unpadding (:func:`anyres_image_tokens`); Idefics3
        writes a row/column-tagged run per crop plus the global image, which its
        processor expands.
        """
        if self.family == "llava":
            return [self.image_token_id] * self.n_image_tokens, {"pixel_values": self._pixels(rel_path)[None]}
        img = load_image(self.image_folder, rel_path)
        if self.family == "idefics3":
            out = self.processor(text=[self.image_token], images=[[img]], add_special_tokens=False,
                                 return_tensors="pt")
            inputs = {k: out[k] for k in ("pixel_values", "pixel_attention_mask") if k in out}
            return out["input_ids"][0].tolist(), inputs
        out = self.image_processor(images=[img], return_tensors="pt")
        if self.family == "qwen2_vl":
            thw = out["image_grid_thw"]  # [1, 3]
            n = int(thw.prod()) // self.image_processor.merge_size ** 2
            return [self.image_token_id] * n, {"pixel_values": out["pixel_values"], "image_grid_thw": thw}
        # llava_next / llava_onevision: pixel_values [1, tiles, 3, H, W] (base image first), image_sizes [1, 2]
        c = self.model_config
        n = anyres_image_tokens(
            tuple(int(v) for v in out["image_sizes"][0]), tuple(out["pixel_values"].shape[-2:]),
            c.vision_config.image_size // c.vision_config.patch_size, c.image_grid_pinpoints,
            cls_token=self.family == "llava_next", drop_first=c.vision_feature_select_strategy == "default",
            max_tiles=_max_tiles(getattr(c, "vision_aspect_ratio", None)) if self.family == "llava_onevision" else None,
        )
        return [self.image_token_id] * n, {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}

    def _images(self, paths: list) -> tuple[list[list[int]] | None, dict | None]:
        """``(each image's token ids, the images' tensors concatenated on the leading axis)``; ``(None, None)`` for none."""
        if not paths:
            return None, None
        per_image = [self._image(p) for p in paths]
        inputs = per_image[0][1] if len(per_image) == 1 else concat_image_inputs([d for _, d in per_image])
        return [ids for ids, _ in per_image], inputs

    def build(self, index: int, record) -> dict:
        """``dict(index, id, input_ids[T], labels[T], pixel_values, image_inputs)``.

        ``image_inputs``: the sample's image tensors with a leading image axis
        (None without image); ``pixel_values`` is ``image_inputs["pixel_values"]``
        without that axis for LLaVA-1.5 (``[3, H, W]``), the whole tensor for
        the other families (Qwen2-VL: ``[patches, C*t*p*p]``). A sample with
        several images (``record["image"]`` a list, one ``<image>`` each) holds
        them along that leading axis in text order, batched by
        :func:`concat_image_inputs` as the images of separate samples are
        (Qwen2-VL: the images' patch runs one after another and one
        ``image_grid_thw`` row each).
        Raises :class:`SampleProblem` (conversation problems first, then image
        ones; any bad image among several makes the whole sample bad).
        """
        if self.template == "vicuna_v1":
            input_ids, labels = tokenize_record(
                record, self.tokenizer, self.image_token_id, self.n_image_tokens, self.max_length
            )
            inputs = self._images(image_list(record))[1]
        else:
            # conversation problems first, then the images (their token counts are part of the length)
            conversation_pairs(record)
            if has_image(record) and not self.supports_images:
                raise SampleProblem("no_image_support", f"image {record['image']!r} given but the model is text-only")
            image_ids, inputs = self._images(image_list(record))
            input_ids, labels = tokenize_chat(record, self.tokenizer, self.render, self.image_token, image_ids,
                                              self.max_length)
        pixel_values = None
        if inputs is not None:
            pixel_values = inputs["pixel_values"][0] if self.family == "llava" else inputs["pixel_values"]
        sample = dict(index=int(index), id=record_id(record, index), input_ids=input_ids, labels=labels,
                      pixel_values=pixel_values, image_inputs=inputs)
        if self.family == "qwen2_vl":
            sample["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        return sample

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


def _image_inputs(sample) -> dict | None:
    """A sample's image tensors with a leading image axis (samples built elsewhere may carry only ``pixel_values [3, H, W]``)."""
    if sample.get("image_inputs") is not None:
        return sample["image_inputs"]
    if sample.get("pixel_values") is not None:
        return {"pixel_values": sample["pixel_values"][None]}
    return None


def concat_image_inputs(inputs: list[dict]) -> dict:
    """Batch per-sample image tensors: zero-pad every axis but the first to the largest, concatenate on the first.

    ``inputs``: one dict per image row, each tensor ``[n_i, ...]`` (``n_i`` images,
    or patches for Qwen2-VL). Zero padding is what each family's processor pads
    with (LLaVA-NeXT tiles, Idefics3 crops and their ``pixel_attention_mask``),
    and the models drop it; tensors of equal trailing shape are not padded.
    """
    out = {}
    for key in inputs[0]:
        parts = [d[key] for d in inputs]
        shape = [max(p.shape[a] for p in parts) for a in range(1, parts[0].dim())]
        padded = []
        for p in parts:
            if list(p.shape[1:]) != shape:
                q = p.new_zeros((p.shape[0], *shape))
                q[(slice(None), *(slice(0, n) for n in p.shape[1:]))] = p
                p = q
            padded.append(p)
        out[key] = torch.cat(padded)
    return out


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
    image_inputs = [_image_inputs(s) for s in good]
    token_types = None
    if any("mm_token_type_ids" in s for s in good):
        token_types = torch.zeros((B, T), dtype=torch.long)
        for b, s in enumerate(good):
            if "mm_token_type_ids" in s:
                token_types[b, : len(s["input_ids"])] = s["mm_token_type_ids"]
    batch = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=labels,
        indices=torch.tensor([s["index"] for s in good], dtype=torch.long),
        ids=[s["id"] for s in good],
        has_image=torch.tensor([d is not None for d in image_inputs], dtype=torch.bool),
        image_inputs=image_inputs,
        errors=errors,
    )
    if token_types is not None:
        batch["mm_token_type_ids"] = token_types
    present = [d for d in image_inputs if d is not None]
    if present:
        batch.update(concat_image_inputs(present))  # batch order
    return batch


def batch_rows(batch: dict, rows: list[int]) -> dict:
    """Rows ``rows`` of a collated batch with their own image tensors, trailing padding trimmed.

    The image tensors are re-batched from the rows' own ``image_inputs`` (a
    Qwen2-VL row owns a run of patches, not one slot of a stacked tensor), so
    the out-of-memory halving and any sub-batch keep each row's images.
    """
    out = {k: batch[k][rows] for k in ("indices", "has_image")}
    out["ids"] = [batch["ids"][r] for r in rows]
    out["image_inputs"] = [batch["image_inputs"][r] for r in rows]
    present = [d for d in out["image_inputs"] if d is not None]
    if present:
        out.update(concat_image_inputs(present))
    length = int(batch["attention_mask"][rows].sum(dim=1).max()) if rows else 0
    for k in TOKEN_KEYS:
        if k in batch:
            out[k] = batch[k][rows][:, :length]
    out["errors"] = []
    return out


def model_kwargs(batch: dict) -> dict:
    """The keyword arguments for ``model(**kwargs)``: input_ids, attention_mask, labels and the image tensors present."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}
