"""Seeded fuzz of the data layer: every mutated record is a sample or a reason, never a crash or a shift.

The long run is ``benchmarks/fuzz_loader.py``.
"""
import json
import time

import pytest

from icons_fast.data import ErrorLog, LlavaDataset, LlavaSampleBuilder, SampleProblem, load_records
from icons_fast.data.errors import REASONS
from icons_fast.data.fuzz import check_records, fuzz_records, make_fuzz_images

N_CI = 10_000
MAX_LENGTH = 256

# what each broken fixture image must be reported as
BAD_IMAGES = {
    "truncated.jpg": "corrupt_image", "truncated.png": "corrupt_image", "zero.jpg": "empty_image",
    "gif_named.jpg": "image_format_mismatch", "png_named.jpeg": "image_format_mismatch",
    "text_named.png": "corrupt_image", "garbage.jpg": "corrupt_image", "jpeg_magic_only.jpg": "corrupt_image",
    "huge_header.png": "corrupt_image", "zero_width.png": "corrupt_image", "loop_a.jpg": "missing_image",
    "loop_b.jpg": "missing_image",
    "dangling.png": "missing_image", "a_directory.jpg": "missing_image",
}


@pytest.fixture(scope="module")
def fuzz_env(tiny_model_dir, tmp_path_factory):
    from transformers import AutoConfig, AutoProcessor

    root = tmp_path_factory.mktemp("fuzz")
    images = make_fuzz_images(str(root / "images"))
    builder = LlavaSampleBuilder(AutoProcessor.from_pretrained(tiny_model_dir),
                                 AutoConfig.from_pretrained(tiny_model_dir), str(root / "images"), MAX_LENGTH)
    return root, images, builder


def _image_record(name):
    return {"id": name, "image": name,
            "conversations": [{"from": "human", "value": "<image>\nwhat shape?"}, {"from": "gpt", "value": "a circle"}]}


def test_fixture_images_load_or_fail_with_their_reason(fuzz_env):
    _, images, builder = fuzz_env
    assert set(BAD_IMAGES) == {k for k, ok in images.items() if not ok}
    for name, ok in images.items():
        if ok:
            assert builder.build(0, _image_record(name))["pixel_values"].shape[0] == 3, name
        else:
            with pytest.raises(SampleProblem) as err:
                builder.build(0, _image_record(name))
            assert err.value.code == BAD_IMAGES[name], (name, err.value.reason)
            assert name in err.value.reason


def test_fuzz_records_are_seeded():
    images = ["ok.png", "zero.jpg"]
    a, b, c = fuzz_records(300, 5, images), fuzz_records(300, 5, images), fuzz_records(300, 6, images)
    assert json.dumps(a) == json.dumps(b) and json.dumps(a) != json.dumps(c)


def test_ten_thousand_mutated_records_never_crash(fuzz_env):
    root, images, builder = fuzz_env
    path = root / "pool.json"
    path.write_text(json.dumps(fuzz_records(N_CI, 0, sorted(images))))  # through json, as a real pool
    records = load_records(str(path))
    dataset = LlavaDataset(records, builder, ErrorLog(str(root / "errors.jsonl")), stage="data")
    t0 = time.perf_counter()
    report = check_records(dataset)
    seconds = time.perf_counter() - t0
    print(f"fuzz: {N_CI} records in {seconds:.1f} s; accepted {report.accepted}; {dict(report.reasons)}")
    assert report.failures == []
    assert report.total == N_CI
    # the fuzz reaches both outcomes and most of the reasons (not stuck on one kind of damage)
    assert report.accepted > N_CI // 10
    assert len(report.reasons) >= 12 and set(report.reasons) <= set(REASONS)


class _Crashes(LlavaSampleBuilder):
    def build(self, index, record):
        if index == 3:
            raise TypeError("boom")
        return super().build(index, record)


class _Shifts(LlavaDataset):
    """Position 2 returns record 3's sample (index 3 twice, index 2 never)."""

    def __getitem__(self, i):
        return super().__getitem__(i + 1 if i == 2 else i)


class _Relabels(LlavaDataset):
    """Position 2 returns record 3's sample under index 2 (the ids give it away)."""

    def __getitem__(self, i):
        if i != 2:
            return super().__getitem__(i)
        return {**super().__getitem__(3), "index": 2}


def test_the_oracle_reports_crashes_and_shifted_indices(fuzz_env):
    _, _, builder = fuzz_env
    text = [{"id": f"t{i}", "conversations": [{"from": "human", "value": "what?"}, {"from": "gpt", "value": "this"}]}
            for i in range(6)]
    report = check_records(LlavaDataset(text, _Crashes(builder.tokenizer, None, None, MAX_LENGTH)))
    assert [i for i, _ in report.failures] == [3] and "TypeError: boom" in report.failures[0][1]
    assert report.accepted == 5
    report = check_records(_Shifts(text, builder), batch_size=4)
    assert [why for _, why in report.failures] == ["batch indices [0, 1, 3, 3] != [0, 1, 2, 3]"]
    report = check_records(_Relabels(text, builder), batch_size=4)
    assert [(i, "shifted" in why) for i, why in report.failures] == [(2, True)]
