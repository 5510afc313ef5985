"""Data layer: pool formats, LLaVA records, the templates (vicuna_v1, the model's own chat template), images, batches, errors, generated data.

Modules (one job each):

- ``formats``: pool files in and out (json, jsonl, ShareGPT, OpenAI messages, parquet, arrow,
  hub datasets) normalised to LLaVA records; the selection written back in the same format.
- ``records``: the internal records (LLaVA-665K style, addressed by index) and their ids.
- ``conversation``: the LLaVA-1.5 template or the model's chat template -> ``input_ids`` / ``labels``
  with exact masks.
- ``images``: image loading with every failure named.
- ``collate``: sample builder (each family's image expansion), torch dataset, padding collate.
- ``errors``: ``SampleProblem`` / ``SampleError`` / ``ErrorLog`` (``errors.jsonl``).
- ``replica``: the generated replica (stage-1 captions and image-text matching, a mixed-source stage-2 pool, benchmarks).
- ``bad_samples``: a pool of malformed records, one per error case.
"""
from icons_fast.data.collate import LlavaDataset, LlavaSampleBuilder, collate, image_token_info, model_kwargs
from icons_fast.data.conversation import IGNORE_INDEX, SYSTEM_PROMPT, render_prompt, tokenize_record
from icons_fast.data.bad_samples import make_bad_samples
from icons_fast.data.errors import REASONS, ErrorLog, SampleError, SampleProblem
from icons_fast.data.images import load_image
from icons_fast.data.records import load_records, record_id, record_ids, save_records
from icons_fast.data.replica import make_stage1_data, make_replica_data

__all__ = [
    "ErrorLog", "IGNORE_INDEX", "LlavaDataset", "LlavaSampleBuilder", "REASONS", "SYSTEM_PROMPT",
    "SampleError", "SampleProblem", "collate", "image_token_info", "load_image", "load_records",
    "make_bad_samples", "make_stage1_data", "make_replica_data", "model_kwargs", "record_id", "record_ids",
    "render_prompt", "save_records", "tokenize_record",
]
