"""Long fuzz of the data layer: N mutated LLaVA records through the loader featurize uses.

Each record is a valid record with 1-3 random mutations (``icons_fast.data.fuzz``);
each must come back as a sample or as an error with a reason code, never a
crash, never a shifted index. Records are generated and checked in chunks
(chunk ``c`` from seed ``(seed, c)``) so memory stays bounded at any N. Prints
the counts by reason and the rate; exits 1 and prints the offending records
when anything fails. The CI run is ``tests/test_fuzz.py`` (10,000 records).

    python benchmarks/fuzz_loader.py --n 1000000 --seed 0
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, out_dir, write_json  # noqa: E402,I001

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402


def main() -> int:
    from transformers import AutoConfig, AutoProcessor

    from icons_fast.data import ErrorLog, LlavaDataset, LlavaSampleBuilder, load_records
    from icons_fast.data.fuzz import check_records, fuzz_records, make_fuzz_images
    from icons_fast.model.tiny import build_tiny_llava

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="records in all")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=10_000, help="records generated and checked at a time")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--json", help="default: $OUT (or benchmarks/out)/fuzz_loader.json")
    args = ap.parse_args()
    env = env_info("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_tiny_llava(os.path.join(tmp, "model"))
        images = make_fuzz_images(os.path.join(tmp, "images"))
        builder = LlavaSampleBuilder(AutoProcessor.from_pretrained(model_dir), AutoConfig.from_pretrained(model_dir),
                                     os.path.join(tmp, "images"), args.max_length)
        reasons, accepted, failures = Counter(), 0, []
        t0 = time.perf_counter()
        for c, start in enumerate(range(0, args.n, args.chunk)):
            n = min(args.chunk, args.n - start)
            pool = os.path.join(tmp, "pool.json")
            with open(pool, "w") as f:  # through a json file, as a real pool
                json.dump(fuzz_records(n, args.seed * 1_000_003 + c, sorted(images)), f)
            records = load_records(pool)
            log = ErrorLog(os.path.join(tmp, f"errors-{c}.jsonl"))
            report = check_records(LlavaDataset(records, builder, log, stage="data"))
            accepted += report.accepted
            reasons.update(report.reasons)
            failures += [(start + i, why, repr(records[i])[:400] if i >= 0 else "") for i, why in report.failures]
            done = start + n
            print(f"  {done:>10,d} records  {time.perf_counter() - t0:8.1f} s  failures {len(failures)}", flush=True)
        seconds = time.perf_counter() - t0
    print(f"# fuzz_loader  {env['date']}  {env['device']}  n={args.n:,d} seed={args.seed} "
          f"max_length={args.max_length}")
    print(f"{seconds:.1f} s, {args.n / seconds:,.0f} records/s")
    print(f"{'accepted':<28}{accepted:>10,d}")
    for code, count in reasons.most_common():
        print(f"{code:<28}{count:>10,d}")
    print(f"{'FAILURES':<28}{len(failures):>10,d}")
    for index, why, rec in failures[:20]:
        print(f"  record {index}: {why}\n    {rec}")
    write_json([{"accepted": accepted, **reasons, "failures": len(failures)}],
               args.json or os.path.join(out_dir(), "fuzz_loader.json"),
               meta={**env, "n": args.n, "seed": args.seed, "seconds": seconds, "failures": failures[:100]})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
