"""The dataset and collate function for one loaded model (used by warmup, featurize, train)."""
from __future__ import annotations

from icons_fast.data.collate import LlavaDataset, LlavaSampleBuilder
from icons_fast.data.errors import ErrorLog
from icons_fast.data.formats import CheckedBuilder


def make_dataset(loaded_model, records: list, image_folder: str | None, max_length: int | None,
                 error_log: ErrorLog | None, stage: str, template: str = "auto"):
    """``(dataset, collate_fn)`` for ``records`` fed to ``loaded_model`` (an ``icons_fast.model.loading.LoadedModel``).

    ``dataset[i]`` is record i's sample dict or its ``SampleError`` (recorded in
    ``error_log`` under ``stage``; a record its format could not read, or with more
    images than the model takes, is one too: ``formats.CheckedBuilder``);
    ``collate_fn`` pads with the tokenizer's pad id and keeps errors under ``batch["errors"]``.
    ``template``: auto | vicuna_v1 | chat (``icons_fast.data.conversation.resolve_template``
    with the model's family and chat template).
    """
    family = loaded_model.family
    config = loaded_model.model.config if family != "causal_lm" else None
    builder = CheckedBuilder(LlavaSampleBuilder(loaded_model.processor, config, image_folder, max_length,
                                                template=template, family=family,
                                                chat_template=loaded_model.chat_template))
    return LlavaDataset(records, builder, error_log, stage=stage), builder.collate
