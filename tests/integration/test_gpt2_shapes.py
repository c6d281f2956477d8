"""The GPT-2 path at the papers' shapes, through the real entry point (``-m slow``: skipped in the default run).

A random-init GPT-2 124M student (``GPT2Config``'s defaults: 12 layers x 768, 1024 positions, vocabulary 50257,
dropout 0.1), a small teacher of the same vocabulary, a local 50257-entry tokenizer (arkd's byte-level BPE extended
with added tokens, since the Hub is out of reach), Dolly-shaped rows of up to 512 tokens, the ``gpt2_120m``
experiment (learned policy, bidirectional KL) in fp32 on the CPU: two optimizer steps, then the run's files. Each
step's wall-clock time is printed (``-s``) for docs/reproduce.md; nothing asserts a time.

    pytest -m slow tests/integration/test_gpt2_shapes.py -s
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

pytestmark = pytest.mark.slow

GPT2_VOCAB = 50257


@pytest.fixture(autouse=True)
def _only_with_m_slow(request):
    # 1-3 min and 9 GB (peak RSS) on a busy 2-core CPU: only when slow tests are asked for (`pytest -m slow`).
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("GPT-2 124M on the CPU; run with `pytest -m slow`")


def _gpt2_sized_tokenizer(out: Path) -> Path:
    """arkd's tiny byte-level BPE (trained on the synthetic corpus) grown to GPT-2's 50257 entries by added tokens."""
    from arkd.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=1024)
    tokenizer.add_tokens([f"<|gpt2_slot_{i}|>" for i in range(GPT2_VOCAB - len(tokenizer))])
    assert len(tokenizer) == GPT2_VOCAB
    tokenizer.save_pretrained(str(out))
    return out


def _dolly_shaped(out: Path, n: int, offset: int = 0) -> Path:
    """MiniLLM-schema rows whose prompts fill most of the 256-token prompt budget and whose responses reach the
    512-token limit (words of the synthetic corpus, one token each for this tokenizer)."""
    from arkd.data import Example, write_jsonl
    from arkd.data.synthetic import synthetic_corpus
    from arkd.data.template import format_prompt

    words = " ".join(synthetic_corpus(400, 3)).split()
    rows = []
    for i in range(n):
        start = (offset + i * 97) % (len(words) - 700)
        instruction = " ".join(words[start : start + 150])
        response = " ".join(words[start + 150 : start + 500])
        rows.append(
            Example(instruction=instruction, input="", references=[response], prompt=format_prompt(instruction))
        )
    return write_jsonl(rows, out)


def test_gpt2_124m_student_two_steps_through_the_entry_point(tmp_path, monkeypatch, capsys):
    from transformers import GPT2Config

    from arkd.config_paths import config_dir
    from arkd.recipes.distill import run
    from arkd.run_log import read_metrics
    from arkd.trainer import Trainer

    tokenizer_dir = _gpt2_sized_tokenizer(tmp_path / "tokenizer")
    train = _dolly_shaped(tmp_path / "train.jsonl", 16)
    valid = _dolly_shaped(tmp_path / "valid.jsonl", 2, offset=5000)
    defaults = GPT2Config()
    overrides = [
        "config=gpt2_120m",
        f"output_dir={tmp_path / 'run'}",
        f"tokenizer.name_or_path={tokenizer_dir}",
        # The student: GPT2Config's defaults (GPT-2 124M), random init.
        "model=tiny",
        "~model.name_or_path",  # gpt2_120m's SFT checkpoint path: not a key of a model built from config
        f"model.n_layer={defaults.n_layer}",
        f"model.n_embd={defaults.n_embd}",
        f"model.n_head={defaults.n_head}",
        f"model.n_positions={defaults.n_positions}",
        f"model.dropout={defaults.resid_pdrop}",
        "teacher=tiny",
        "teacher.n_positions=1024",
        f"data.splits.train.source={train}",
        "data.splits.train.format=auto",
        f"data.splits.validation.source={valid}",
        f"data.splits.test.source={valid}",
        "data.batch_size=4",  # rows of 512 tokens: [4, 512] batches, logits [4, 511, 50257]
        "trainer.grad_accum=1",
        "trainer.precision=fp32",
        "trainer.cpu=true",
        "trainer.num_threads=2",
        "trainer.max_steps=2",
        "trainer.warmup_steps=0",
        "trainer.log_interval=1",
        "trainer.eval_interval=0",
        "trainer.save_interval=0",
        "trainer.progress=false",
        "validation.subset=1",
        "validation.max_new_tokens=2",
        "report.enabled=false",
    ]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)

    seconds: list[float] = []
    built: dict[str, torch.nn.Module] = {}
    original_step, original_init = Trainer.train_step, Trainer.__init__

    def timed_step(self):
        started = time.perf_counter()
        out = original_step(self)
        seconds.append(time.perf_counter() - started)
        return out

    def keep_models(self, *args, **kwargs):
        built.update(student=kwargs["student"], teacher=kwargs["teacher"])
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", timed_step)
    monkeypatch.setattr(Trainer, "__init__", keep_models)
    summary = run(cfg)

    assert summary["steps"] == 2 and len(seconds) == 2
    student = built["student"]
    n_params = sum(p.numel() for p in student.parameters())
    assert type(student).__name__ == "GPT2LMHeadModel" and n_params == 124_439_808  # GPT-2 small, tied embedding
    for key in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size", "resid_pdrop", "attn_pdrop"):
        assert getattr(student.config, key) == getattr(defaults, key), key
    assert built["teacher"].config.vocab_size == GPT2_VOCAB

    run_dir = Path(summary["run_dir"])
    for name in ("metrics.jsonl", "final/model.safetensors", "final/config.json", "final/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "final" / "config.json").read_text())["vocab_size"] == GPT2_VOCAB
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("split") != "validation" and "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    rates = [round(r["tokens_per_sec"], 1) for r in rows]
    with capsys.disabled():
        print(
            f"\ngpt2_124m CPU fp32, 2 threads, batch 4: step seconds {[round(s, 1) for s in seconds]}; "
            f"counted tokens/s logged {rates}; params {n_params}"
        )
