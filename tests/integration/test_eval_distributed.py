"""Sharded generation under a real process group: two gloo CPU processes run the trainer's validation predict and
``evaluate_model``; both get what one process gets."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
PROMPTS = ["the cat sat on the mat", "a", "b c", "the dog ran all day and then it rested", "e f", "g", "a c e"]
REFERENCES = ["the cat", "a b", "c", "the dog rested", "f", "g g", "a"]


def _tiny():
    from arkd.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer([" ".join(PROMPTS + REFERENCES)] * 3, vocab_size=280)
    model = build_tiny_model(len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=64, seed=0).eval()
    return model, tokenizer


def _outputs(model, tokenizer) -> dict:
    from arkd.evaluation import DecodingConfig, evaluate_model
    from arkd.recipes.distill import _predict

    decoding = DecodingConfig(max_new_tokens=8)
    examples = [SimpleNamespace(prompt=p, references=[r]) for p, r in zip(PROMPTS, REFERENCES)]
    validation = _predict(model, examples, tokenizer=tokenizer, seed=3, batch_size=2, decoding=decoding)
    rows = [{"prompt": p, "references": [r]} for p, r in zip(PROMPTS, REFERENCES)]
    report = evaluate_model(model, tokenizer, rows, seeds=[10, 20], batch_size=3, decoding=decoding, progress=False)
    return {"validation": validation, "report": report}


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.save(_outputs(*_tiny()), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The harness leaves without interpreter finalisation, as test_policy_distributed.py's workers do (gloo in
    # torch 2.13 can abort a worker's teardown); the results are checked by the parent.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_validation_and_evaluate_model_on_two_processes_equal_one(tmp_path, one_torch_thread):
    mp.spawn(worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = _outputs(*_tiny())
    assert single["report"]["rows_per_process"] == [7] and single["report"]["num_processes"] == 1
    for result in ranks:  # every process holds the whole, ordered result
        assert result["validation"] == single["validation"]
        report = dict(result["report"])
        assert report.pop("num_processes") == 2 and report.pop("rows_per_process") == [4, 3]
        assert report == {k: v for k, v in single["report"].items() if k not in ("num_processes", "rows_per_process")}
    assert any(single["validation"]) and single["report"]["generations"]["10"] != single["report"]["generations"]["20"]
