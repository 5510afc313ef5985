"""Featurize stage helpers: out-of-memory retry in halves (with images), sub-batches, shard ownership."""
import pytest
import torch

from icons_fast.config import ModelConfig
from icons_fast.data import ErrorLog, load_records, make_replica_data
from icons_fast.data.loader import make_dataset
from icons_fast.distributed import parse_shard, process_share
from icons_fast.features.extractor import GradientExtractor
from icons_fast.data.collate import batch_rows
from icons_fast.stages.featurize import featurize_resilient
from icons_fast.model.loading import load_model
from icons_fast.model.lora import attach_lora


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    data = make_replica_data(str(tmp_path_factory.mktemp("d")), n_train=12, n_target=1, n_eval=1)
    lm = load_model(tiny_model_dir)
    model = attach_lora(lm.model, ModelConfig(lora_r=4, lora_alpha=8))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ds, collate = make_dataset(lm, load_records(data["train"]), data["image_folder"], 1024, ErrorLog(None), "data")
    batch = collate([ds[i] for i in range(8)])
    assert batch["has_image"].any() and not batch["has_image"].all()  # images and text-only rows mixed
    return GradientExtractor(model, proj_dim=24, seed=1), batch


class OOMAbove:
    """An extractor that runs out of memory on batches larger than ``limit`` (or on the listed sample ids)."""

    def __init__(self, inner, limit, always=()):
        self.inner, self.limit, self.always, self.proj_dim, self.calls = inner, limit, set(always), inner.proj_dim, []

    def featurize(self, batch):
        self.calls.append(len(batch["ids"]))
        if len(batch["ids"]) > self.limit or self.always & set(batch["ids"]):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.featurize(batch)


def test_batch_rows_keeps_each_rows_own_image(setup):
    ex, batch = setup
    full = ex.featurize(batch)
    for rows in ([1, 5, 6], [7], [0, 2, 3, 4]):
        torch.testing.assert_close(ex.featurize(batch_rows(batch, rows)), full[rows], rtol=1e-4, atol=1e-6)


def test_out_of_memory_batch_is_retried_in_halves(setup):
    ex, batch = setup
    retries = []
    flaky = OOMAbove(ex, limit=2)
    g, oom = featurize_resilient(flaky, batch, lambda size, idx: retries.append((size, idx)))
    torch.testing.assert_close(g, ex.featurize(batch), rtol=1e-4, atol=1e-6)
    assert oom == [] and [s for s, _ in retries] == [8, 4, 4]
    assert retries[0][1] == batch["indices"].tolist()


def test_a_sample_that_never_fits_is_reported_not_dropped(setup):
    ex, batch = setup
    victim = batch["ids"][5]
    g, oom = featurize_resilient(OOMAbove(ex, limit=8, always=[victim]), batch, lambda *a: None)
    assert oom == [5] and torch.isnan(g[5]).all()
    keep = [r for r in range(8) if r != 5]
    torch.testing.assert_close(g[keep], ex.featurize(batch)[keep], rtol=1e-4, atol=1e-6)


def test_other_errors_are_not_swallowed(setup):
    ex, batch = setup

    class Broken:
        proj_dim = 24

        def featurize(self, batch):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    with pytest.raises(RuntimeError, match="illegal memory access"):
        featurize_resilient(Broken(), batch, lambda *a: None)


def test_process_share_covers_every_range_once():
    ranges = list(range(11))
    for world in (1, 2, 3, 4, 11, 13):
        parts = [process_share(ranges, r, world) for r in range(world)]
        assert sum(parts, []) == ranges
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parse_shard("2/5") == (2, 5)
    with pytest.raises(ValueError, match="i/n"):
        parse_shard("2-5")
    with pytest.raises(ValueError, match="out of range"):
        process_share(ranges, 3, 3)
