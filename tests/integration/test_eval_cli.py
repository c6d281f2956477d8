"""arkd-eval end to end: the real entry point on a tiny model, its errors, and the real protocol files."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from arkd.cli.eval import _task, main
from arkd.data.template import format_prompt
from arkd.evaluation import validate_results
from arkd.models import build_tiny_model, build_tiny_tokenizer, save_pretrained
from arkd.recipes.evaluate import compose

REPO = Path(__file__).resolve().parents[2]
ROWS = [
    ("Name a primary colour.", "", ["Red is a primary colour."]),
    ("Summarise the text.", "The cat sat on the mat all day.", ["A cat sat on a mat.", "The cat rested."]),
    ("Translate to French: hello", "", ["bonjour"]),
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    texts = [format_prompt(i, x) + refs[0] for i, x, refs in ROWS] * 4
    tokenizer = build_tiny_tokenizer(texts, vocab_size=320)
    model = build_tiny_model(len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=512, seed=0)
    path = tmp_path_factory.mktemp("tiny_lm")
    save_pretrained(model, tokenizer, path)
    return path


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny_bert")
    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    core.train_from_iterator(
        [" ".join(r[0] for _, _, r in ROWS)] * 3,
        trainers.WordPieceTrainer(vocab_size=150, special_tokens=specials, show_progress=False),
    )
    tokenizer = BertTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=128,
    )  # fmt: skip
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=128,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A data_dir laid out like ../shared/data, with a 3-row 'dolly' file, and a free-standing custom JSONL."""
    root = tmp_path_factory.mktemp("data")
    (root / "dolly").mkdir()
    rows = [
        {"instruction": i, "input": x, "output": refs if len(refs) > 1 else refs[0], "prompt": format_prompt(i, x)}
        for i, x, refs in ROWS
    ]
    (root / "dolly" / "minillm_dolly_test500.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "custom.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return root


def _main(argv: list[str], monkeypatch, tmp_path: Path) -> None:
    """Run the console entry point ``arkd.cli.eval:main`` in this process (Hydra reads sys.argv).

    Hydra's logging set-up is switched off (the ``none`` presets): its ``dictConfig`` would close pytest's own log
    capture handlers.
    """
    monkeypatch.chdir(tmp_path)
    hydra = [f"hydra.run.dir={tmp_path / 'hydra'}", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", ["arkd-eval", *argv, *hydra])
    main()


def test_arkd_eval_entry_point_end_to_end(tiny_model_dir, tiny_bert_dir, data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = [
        f"model_path={tiny_model_dir}", f"data_dir={data_dir}",
        f"datasets=[dolly,{data_dir / 'custom.jsonl'}]", "seeds=[10,20]", "batch_size=2", "decoding.max_new_tokens=6",
        f"bertscore.model_type={tiny_bert_dir}", "bertscore.num_layers=1", "progress=false", f"output_dir={out}",
        "label=tiny",
    ]  # fmt: skip
    _main(argv, monkeypatch, tmp_path)
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    assert results["label"] == "tiny" and results["settings"]["seeds"] == [10, 20]
    assert set(results["datasets"]) == {"dolly", "custom"}
    assert results["datasets"]["dolly"]["n_rows"] == 3 and results["datasets"]["custom"]["n_rows"] == 2
    bert = results["settings"]["bertscore"]
    assert bert["enabled"] and bert["model_type"] == str(tiny_bert_dir) and bert["num_layers"] == 1
    assert results["model"]["weights_sha256"] and results["model"]["n_parameters"] > 0
    assert results["config"]["decoding"]["max_new_tokens"] == 6
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == (3 + 2) * 2  # every row under every seed
    assert {"rougeL", "exact_match", "bertscore_f1", "generation", "references"} <= set(records[0])
    assert "| dolly | 3 |" in (out / "results.md").read_text()
    assert "| dolly | 3 |" in capsys.readouterr().out


def _run_task(overrides: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        _task(compose(overrides))
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_errors_are_one_sentence(tiny_model_dir, data_dir, tmp_path, capsys):
    base = [f"data_dir={data_dir}", f"output_dir={tmp_path}", "bertscore.enabled=false"]
    cases = [
        ([f"model_path={tmp_path / 'no_such_model'}", *base], "model_path="),
        ([f"model_path={tiny_model_dir}", "datasets=[nope]", *base], "unknown dataset 'nope'"),
        ([f"model_path={tiny_model_dir}", "datasets=[sni]", *base], "set data_dir=DIR"),
        ([*base], "model_path is required"),
        ([f"model_path={tiny_model_dir}", "seeds=[]", *base], "seeds is empty"),
        (
            [f"model_path={tiny_model_dir}", f"data_dir={data_dir}", "datasets=[dolly]", f"output_dir={tmp_path}",
             f"bertscore.model_type={tmp_path / 'no_bert'}"],
            "bertscore.enabled=false",
        ),
    ]  # fmt: skip
    for overrides, expected in cases:
        code, err = _run_task(overrides, capsys)
        assert code == 2
        assert expected in err and err.startswith("arkd-eval: ")
        assert "\n" not in err and "Traceback" not in err


def test_missing_model_through_the_console_entry_point(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main([f"model_path={tmp_path / 'absent'}", "bertscore.enabled=false"], monkeypatch, tmp_path)
    assert exit_info.value.code == 2
    expected = (
        f"arkd-eval: model_path={tmp_path / 'absent'}: no such directory; expected a model directory or a Hub name."
    )
    assert capsys.readouterr().err.strip() == expected


def test_console_script_is_declared():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'arkd-eval = "arkd.cli.eval:main"' in pyproject


def test_every_shipped_dataset_name_has_a_file_and_a_default(tmp_path):
    cfg = compose(["model_path=x"])
    assert set(cfg.files) >= {"dolly", "sni", "unni"}
    assert cfg.default_max_rows.unni == 10000 and list(cfg.seeds) == [10, 20, 30, 40, 50]
    assert cfg.bertscore.model_type == "roberta-large" and cfg.bertscore.num_layers == 17
    assert (cfg.decoding.top_k, cfg.decoding.top_p, cfg.decoding.no_repeat_ngram_size) == (0, 1.0, 6)


def test_real_protocol_files_end_to_end(shared_data, tiny_model_dir, tiny_bert_dir, tmp_path):
    """A few rows of each real file through scripts/evaluate_checkpoint.py (compose + run, in process)."""
    spec = importlib.util.spec_from_file_location("evaluate_checkpoint", REPO / "scripts" / "evaluate_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "real"
    argv = [
        str(tiny_model_dir), "--data-dir", str(shared_data), "--seeds", "10", "--max-rows", "3", "--batch-size", "3",
        "--bertscore-model", str(tiny_bert_dir), "--bertscore-layer", "2", "--output-dir", str(out),
        "--set", "decoding.max_new_tokens=6", "progress=false",
    ]  # fmt: skip
    assert script.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    assert set(results["datasets"]) == {"dolly", "sni", "unni"}
    assert all(entry["n_rows"] == 3 for entry in results["datasets"].values())
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    sni = [r for r in records if r["dataset"] == "sni"]
    assert len(records) == 9 and all(isinstance(r["references"], list) for r in sni)
    first = json.loads((shared_data / "dolly" / "minillm_dolly_test500.jsonl").read_text().splitlines()[0])
    assert records[0]["prompt"] == first["prompt"].replace("<n>", "\n")
