"""Peak memory and time of ``compute_features`` at GPT-2 shapes: one chunk of all counted rows against the default
chunks, each in a fresh process (peak resident memory above the logits themselves).

    python scripts/bench_features.py                    # [8, 511, 50257], 656 and 4088 counted tokens
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(batch: int, length: int, vocab: int, counted: int, chunk: int | None) -> dict:
    import torch

    from arkd.policy.features import compute_features

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    s = torch.randn(batch, length, vocab, generator=g)
    t = torch.randn(batch, length, vocab, generator=g)
    mask = torch.zeros(batch * length, dtype=torch.bool)
    mask[torch.randperm(batch * length, generator=g)[:counted]] = True
    mask = mask.view(batch, length)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    compute_features(s, t, mask, chunk_size=chunk)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    extra = round((peak - before) / 1024, 1)
    return {"counted": counted, "chunk": chunk, "extra_mib": extra, "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=511)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--counted", type=int, nargs="+", default=[656, 4088])
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        b, n, v, c, k = args.child
        print(json.dumps(_child(int(b), int(n), int(v), int(c), None if k == "default" else int(k))))
        return
    for counted in args.counted:
        for chunk in (str(counted), "default"):
            cmd = [sys.executable, __file__, "--child", str(args.batch), str(args.length), str(args.vocab),
                   str(counted), chunk]  # fmt: skip
            result = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            label = "one chunk (all rows)" if chunk != "default" else "default chunks"
            extra, seconds = result["extra_mib"], result["seconds"]
            print(f"{counted:>5} counted tokens, {label:>20}: +{extra:>7.1f} MiB, {seconds:.2f} s")


if __name__ == "__main__":
    main()
