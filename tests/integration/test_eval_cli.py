"""arkd-eval end to end: the real entry point on a tiny model, its errors, and the real protocol files."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
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
BIN = Path(sys.executable).parent
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
    # seven rows of different prompt lengths for the sharded evaluation (odd: the processes get unequal shares)
    words = "the cat sat on a mat all day and then it rested".split()
    many = [
        {"instruction": " ".join(words[: 2 + (3 * k) % 10]), "input": "", "output": ROWS[k % 3][2][0]} for k in range(7)
    ]
    (root / "many.jsonl").write_text("".join(json.dumps(r) + "\n" for r in many))
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _without_process_fields(results: dict) -> dict:
    """results.json less what may differ between two runs of one evaluation on 1 and 2 processes."""
    results = json.loads(json.dumps(results))
    for key in ("created_utc", "environment"):
        results.pop(key)
    results["settings"].pop("num_processes")
    results["config"].pop("output_dir")
    for entry in results["datasets"].values():
        entry.pop("rows_per_process")
    return results


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed")
def test_two_gloo_processes_write_the_results_of_one(tiny_model_dir, tiny_bert_dir, data_dir, tmp_path, monkeypatch):
    """`torchrun --nproc_per_node 2 -m arkd.cli.eval` shares the rows over two CPU processes; results.json and
    generations.jsonl equal one process's, apart from the process counts."""
    argv = [
        f"model_path={tiny_model_dir}", f"data_dir={data_dir}", f"datasets=[dolly,{data_dir / 'many.jsonl'}]",
        "seeds=[10,20]", "batch_size=2", "decoding.max_new_tokens=8", f"bertscore.model_type={tiny_bert_dir}",
        "bertscore.num_layers=1", "progress=false", "hash_weights=true", "label=tiny", "device=auto",
    ]  # fmt: skip
    one = tmp_path / "one"
    _main([*argv, f"output_dir={one}"], monkeypatch, tmp_path)
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [
        str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "arkd.cli.eval", *argv, f"output_dir={two}", f"hydra.run.dir={tmp_path / 'hydra2'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert a["settings"]["num_processes"] == 1 and b["settings"]["num_processes"] == 2
    assert a["datasets"]["many"]["rows_per_process"] == [7] and b["datasets"]["many"]["rows_per_process"] == [4, 3]
    assert b["datasets"]["dolly"]["rows_per_process"] == [2, 1]
    assert _without_process_fields(a) == _without_process_fields(b)
    assert (one / "generations.jsonl").read_text() == (two / "generations.jsonl").read_text()
    assert proc.stdout.count("[arkd-eval] wrote") == 1  # rank 0 alone writes and prints
    assert sorted(p.name for p in two.iterdir()) == ["generations.jsonl", "results.json", "results.md"]


def test_a_padded_embedding_matrix_is_sliced_to_the_tokenizer(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """A checkpoint with more output rows than tokens (Qwen2.5: 151936 for 151665) generates what the same model
    without the padded rows generates: the extra rows are dropped before sampling and the count is recorded."""
    from arkd.models import load_model, load_tokenizer, slice_to_vocab

    tokenizer = load_tokenizer(tiny_model_dir)
    padded = build_tiny_model(len(tokenizer) + 37, n_layer=1, n_head=2, n_embd=16, n_positions=512, seed=3)
    with torch.no_grad():  # make the padded rows the likeliest tokens: sampled unless they are dropped
        padded.get_output_embeddings().weight[len(tokenizer) :] *= 50
    save_pretrained(padded, tokenizer, tmp_path / "padded")
    save_pretrained(slice_to_vocab(load_model(tmp_path / "padded"), len(tokenizer)), tokenizer, tmp_path / "sliced")
    common = [f"data_dir={data_dir}", "datasets=[dolly]", "seeds=[10]", "decoding.max_new_tokens=6",
              "bertscore.enabled=false", "progress=false"]  # fmt: skip
    for name in ("padded", "sliced"):
        _main(
            [f"model_path={tmp_path / name}", *common, f"output_dir={tmp_path / (name + '_run')}"],
            monkeypatch,
            tmp_path,
        )
    results = json.loads((tmp_path / "padded_run" / "results.json").read_text())
    assert results["model"]["padded_rows_dropped"] == 37
    generations = [(tmp_path / f"{n}_run" / "generations.jsonl").read_text() for n in ("padded", "sliced")]
    assert generations[0] == generations[1]


def test_a_model_with_fewer_rows_than_tokens_is_refused(tiny_model_dir, data_dir, tmp_path, capsys):
    from arkd.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    small = build_tiny_model(len(tokenizer) - 5, n_layer=1, n_head=2, n_embd=16, n_positions=64, seed=0)
    save_pretrained(small, tokenizer, tmp_path / "small")
    overrides = [f"model_path={tmp_path / 'small'}", f"tokenizer_path={tiny_model_dir}", f"data_dir={data_dir}",
                 "datasets=[dolly]", f"output_dir={tmp_path / 'out'}", "bertscore.enabled=false"]  # fmt: skip
    capsys.readouterr()
    code, err = _run_task(overrides, capsys)
    last = err.splitlines()[-1]  # after the weight-loading progress bars
    assert (
        code == 2
        and last.startswith("arkd-eval: ")
        and f"{len(tokenizer) - 5} output rows for a tokenizer of {len(tokenizer)} tokens" in last
    )


def test_backend_errors_are_one_sentence(tiny_model_dir, data_dir, tmp_path, capsys, monkeypatch):
    base = [f"model_path={tiny_model_dir}", f"data_dir={data_dir}", "datasets=[dolly]", f"output_dir={tmp_path}",
            "bertscore.enabled=false"]  # fmt: skip
    monkeypatch.setitem(sys.modules, "vllm", None)  # whether or not vllm is installed: `import vllm` fails
    cases = [
        (["backend=nope"], "backend=nope; expected one of hf, vllm."),
        (["backend=vllm"], "backend=vllm has no n-gram ban but decoding.no_repeat_ngram_size=6"),
        (["backend=vllm", "decoding.no_repeat_ngram_size=0"], "needs the vllm package, which is not installed"),
    ]
    for overrides, expected in cases:
        code, err = _run_task([*base, *overrides], capsys)
        assert code == 2 and expected in err and "\n" not in err
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = _run_task([*base, "backend=vllm", "decoding.no_repeat_ngram_size=0"], capsys)
    assert code == 2 and "backend=vllm runs in one process" in err


def test_vllm_backend_through_arkd_eval_with_a_stand_in(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """arkd-eval backend=vllm wires the generator in: requests from arkd's encoding, results recorded as vllm's.
    (A recording stand-in replaces vllm here; the real one is the next test, skipped without vllm.)"""
    from types import ModuleType, SimpleNamespace

    calls = []

    class LLM:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def generate(self, requests, params, use_tqdm=False):
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=r["prompt_token_ids"][:3])]) for r in requests]

    module = ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, lambda **kwargs: SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    out = tmp_path / "run"
    argv = [f"model_path={tiny_model_dir}", f"data_dir={data_dir}", "datasets=[dolly]", "seeds=[10]",
            "backend=vllm", "decoding.no_repeat_ngram_size=0", "bertscore.enabled=false", "progress=false",
            f"output_dir={out}", "+vllm.gpu_memory_utilization=0.3"]  # fmt: skip
    _main(argv, monkeypatch, tmp_path)
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    assert results["settings"]["backend"] == "vllm" and results["model"]["device"] == "vllm"
    assert results["model"]["n_parameters"] == sum(
        p.numel()
        for p in build_tiny_model(
            results["model"]["tokenizer"]["vocab_size"], n_layer=1, n_head=2, n_embd=16, n_positions=512
        ).parameters()
    )
    assert calls == [{"model": str(tiny_model_dir), "tokenizer": str(tiny_model_dir), "dtype": "float32",
                      "gpu_memory_utilization": 0.3}]  # fmt: skip
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["generation"] for r in records)  # the stand-in echoes 3 prompt tokens


@pytest.mark.gpu
def test_real_vllm_backend(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """Real vLLM on the tiny GPT-2 model: skipped where vllm (a CUDA machine) is not installed."""
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    argv = [f"model_path={tiny_model_dir}", f"data_dir={data_dir}", "datasets=[dolly]", "seeds=[10]",
            "backend=vllm", "decoding.no_repeat_ngram_size=0", "decoding.max_new_tokens=8",
            "bertscore.enabled=false", "progress=false", f"output_dir={out}",
            "+vllm.gpu_memory_utilization=0.2", "+vllm.enforce_eager=true"]  # fmt: skip
    _main(argv, monkeypatch, tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["backend"] == "vllm" and results["datasets"]["dolly"]["n_rows"] == 3


def test_teacher_path_adds_the_distribution_metrics(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    from arkd.evaluation.distribution import distinct_n, self_bleu, teacher_forced_metrics
    from arkd.models import load_model, load_tokenizer

    # a second model with the same tokenizer as the teacher
    tokenizer = load_tokenizer(tiny_model_dir)
    teacher = build_tiny_model(len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=512, seed=1)
    teacher_dir = tmp_path / "teacher"
    save_pretrained(teacher, tokenizer, teacher_dir)
    out = tmp_path / "run"
    argv = [
        f"model_path={tiny_model_dir}", f"teacher_path={teacher_dir}", f"data_dir={data_dir}", "datasets=[dolly]",
        "seeds=[10,20]", "batch_size=2", "decoding.max_new_tokens=6", "bertscore.enabled=false", "progress=false",
        f"output_dir={out}", "distribution.head_top_p=0.8",
    ]  # fmt: skip
    _main(argv, monkeypatch, tmp_path)
    results = json.loads((out / "results.json").read_text())
    validate_results(results)
    entry = results["datasets"]["dolly"]
    assert set(entry) >= {"fkl", "rkl", "head_recall", "tail_recall", "distinct_1", "distinct_2", "self_bleu"}
    assert results["settings"]["teacher"] == {"source": str(teacher_dir), "head_top_p": 0.8}
    # the same numbers recomputed from the written generations and the two models
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    by_seed = {s: [r["generation"] for r in records if r["seed"] == s] for s in (10, 20)}
    assert entry["distinct_2"]["mean"] == pytest.approx(distinct_n(by_seed[10] + by_seed[20], 2), abs=1e-5)
    assert entry["self_bleu"]["mean"] == pytest.approx(self_bleu(by_seed), abs=1e-5)
    rows = [{"prompt": r["prompt"], "references": r["references"]} for r in records if r["seed"] == 10]
    tf = teacher_forced_metrics(load_model(tiny_model_dir), load_model(teacher_dir), tokenizer, rows, top_p=0.8)
    for key in ("fkl", "rkl", "head_recall", "tail_recall"):
        assert entry[key]["mean"] == pytest.approx(tf[key], abs=1e-5)
        assert entry[key]["per_seed"] == {} and entry[key]["std"] is None
    assert "Distribution-level metrics" in (out / "results.md").read_text()


def test_bad_teacher_settings_are_one_sentence(tiny_model_dir, data_dir, tmp_path, capsys):
    base = [f"model_path={tiny_model_dir}", f"data_dir={data_dir}", "datasets=[dolly]", "bertscore.enabled=false"]
    code, err = _run_task([*base, f"output_dir={tmp_path}", f"teacher_path={tmp_path / 'absent'}"], capsys)
    assert code == 2 and "teacher_path=" in err and "\n" not in err
    code, err = _run_task([*base, f"output_dir={tmp_path}", "distribution.head_top_p=1.5"], capsys)
    assert code == 2 and "distribution.head_top_p=1.5" in err
