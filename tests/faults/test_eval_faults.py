"""arkd-eval and arkd-compare under faults: outputs of an earlier run, unwritable output folders, a diverged (NaN)
model, and a data file with an invalid UTF-8 byte. Each is one sentence, exit 2, before the slow work starts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from arkd.data.template import format_prompt
from arkd.models import build_tiny_model, build_tiny_tokenizer, save_pretrained

ROWS = [("Name a primary colour.", "", "Red."), ("Translate to French: hello", "", "bonjour")]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    tokenizer = build_tiny_tokenizer([format_prompt(i, x) + y for i, x, y in ROWS] * 4, vocab_size=300)
    model = build_tiny_model(len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=256, seed=0)
    path = tmp_path_factory.mktemp("tiny_lm")
    save_pretrained(model, tokenizer, path)
    nan = tmp_path_factory.mktemp("nan_lm")
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    save_pretrained(model, tokenizer, nan)
    blown = tmp_path_factory.mktemp("nan_outputs_lm")  # finite weights (1e30), every output NaN
    model = build_tiny_model(len(tokenizer), n_layer=1, n_head=2, n_embd=16, n_positions=256, seed=0)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(1e30)
        model.transformer.h[0].mlp.c_proj.weight.mul_(1e30)
    save_pretrained(model, tokenizer, blown)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    rows = [{"instruction": i, "input": x, "output": y, "prompt": format_prompt(i, x)} for i, x, y in ROWS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _arkd_eval(argv, tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    from arkd.cli.eval import main

    monkeypatch.chdir(tmp_path)
    hydra = [f"hydra.run.dir={tmp_path / 'hydra'}", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", ["arkd-eval", *argv, "bertscore.enabled=false", "progress=false", *hydra])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1, err  # (transformers' own weight-loading bar aside)
    return info.value.code, lines[0]


def test_arkd_eval_refuses_the_outputs_of_an_earlier_evaluation(
    tiny_model_dir, data_file, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"earlier": true}')
    argv = [f"model_path={tiny_model_dir}", f"datasets=[{data_file}]", f"output_dir={out}"]
    code, err = _arkd_eval(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err == (
        f"arkd-eval: the output directory {out} already holds results.json; expected a new directory, or "
        "overwrite=true to replace them."
    )
    assert (out / "results.json").read_text() == '{"earlier": true}'


def test_arkd_eval_checks_its_output_directory_before_generating(
    tiny_model_dir, data_file, tmp_path, monkeypatch, capsys
):
    blocker = tmp_path / "file"
    blocker.write_text("")
    argv = [f"model_path={tiny_model_dir}", f"datasets=[{data_file}]", f"output_dir={blocker / 'out'}"]
    code, err = _arkd_eval(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err == f"arkd-eval: cannot write to the output directory {blocker / 'out'}: a part of the path is a file."


def test_arkd_eval_refuses_a_nan_model_before_generating(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    nan_dir = next(tiny_model_dir.parent.glob("nan_lm*"))
    argv = [f"model_path={nan_dir}", f"datasets=[{data_file}]", f"output_dir={tmp_path / 'out'}"]
    code, err = _arkd_eval(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.startswith(f"arkd-eval: model_path={nan_dir}: 1 weight tensor(s) hold NaN or inf (first: ")
    assert not (tmp_path / "out" / "results.json").exists()


def test_arkd_eval_refuses_a_model_with_finite_weights_and_nan_outputs(
    tiny_model_dir, data_file, tmp_path, monkeypatch, capsys
):
    blown = next(tiny_model_dir.parent.glob("nan_outputs_lm*"))
    assert all(bool(torch.isfinite(t).all()) for t in load_file(blown / "model.safetensors").values())
    argv = [f"model_path={blown}", f"datasets=[{data_file}]", f"output_dir={tmp_path / 'out'}"]
    code, err = _arkd_eval(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.startswith(f"arkd-eval: model_path={blown}: its outputs on a probe input hold NaN or inf ("), err
    assert not (tmp_path / "out" / "results.json").exists()
    assert not (tmp_path / "out" / "generations.jsonl").exists()


def test_arkd_eval_refuses_prompts_and_new_tokens_beyond_the_models_positions(
    tiny_model_dir, data_file, tmp_path, monkeypatch, capsys
):
    """The default decoding (256 prompt + 256 new tokens) on a 256-position model: before, a bare IndexError once a
    generation ran past the positions (here forced by 300 new tokens)."""
    argv = [f"model_path={tiny_model_dir}", f"datasets=[{data_file}]", f"output_dir={tmp_path / 'out'}",
            "decoding.max_new_tokens=300", "seeds=[1]"]  # fmt: skip
    code, err = _arkd_eval(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.startswith("arkd-eval: decoding.max_new_tokens=300: the longest prompt has "), err
    assert f"but model_path={tiny_model_dir} has 256 positions; expected at most " in err
    assert not (tmp_path / "out" / "generations.jsonl").exists()


def test_arkd_eval_names_file_and_line_of_an_invalid_utf8_byte(
    tiny_model_dir, data_file, tmp_path, monkeypatch, capsys
):
    bad = tmp_path / "bad.jsonl"
    lines = data_file.read_bytes().splitlines(keepends=True)
    bad.write_bytes(lines[0] + lines[1].replace(b"bonjour", b"bonj\xc3our"))
    argv = [f"model_path={tiny_model_dir}", f"datasets=[{bad}]", f"output_dir={tmp_path / 'out'}"]
    code, err = _arkd_eval(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.startswith(f"arkd-eval: dataset 'bad' ({bad}): {bad}, line 2: invalid UTF-8 byte 0xc3 at byte ")
    assert err.endswith("of the line; expected a UTF-8 text file")


def test_arkd_compare_refuses_an_earlier_comparison(tmp_path, capsys):
    from arkd.cli.compare import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "comparison.md").write_text("earlier")
    assert main([str(tmp_path / "runs"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"arkd-compare: the output directory {out} already holds comparison.md; expected a new directory, or "
        "--overwrite to replace them."
    )
    assert (out / "comparison.md").read_text() == "earlier"


# -- Processes that disagree ------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(module: str, args: list[str], tmp_path: Path, rank1_args: str = "", timeout: int = 240):
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), ARKD_TEST_RANK1_ARGS=rank1_args)
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [
        str(BIN / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(Path(__file__).parent / "_rank_args.py"), module, *args,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(not (BIN / "torchrun").exists(), reason="torchrun is not installed")
def test_sharded_arkd_eval_refuses_processes_asked_for_another_model(tiny_model_dir, data_file, tmp_path):
    """Rank 1 given another model: before, exit 0 with results naming one model and holding both models' rows."""
    other = tmp_path / "other_lm"
    import shutil

    shutil.copytree(tiny_model_dir, other)
    out = tmp_path / "out"
    args = [
        f"model_path={tiny_model_dir}", f"datasets=[{data_file}]", "seeds=[10]", "decoding.max_new_tokens=4",
        "bertscore.enabled=false", "progress=false", "device=cpu", f"output_dir={out}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]  # fmt: skip
    proc = _torchrun("arkd.cli.eval", args, tmp_path, rank1_args=f"model_path={other}")
    assert proc.returncode != 0
    assert (
        f"arkd-eval: the 2 processes of this evaluation were not asked the same: process 1 has model_path: "
        f"'{other}' (process 0: '{tiny_model_dir}'); expected one command" in proc.stderr
    ), proc.stderr[-3000:]
    assert "arkd/recipes" not in proc.stderr, proc.stderr[-3000:]  # (torchrun prints its own summary of the exits)
    assert not (out / "results.json").exists() and not (out / "generations.jsonl").exists()


# -- Work kept at the last step -------------------------------------------------------------------------------------


@pytest.fixture
def seven_rows(tmp_path) -> Path:
    path = tmp_path / "seven.jsonl"
    rows = [(f"Say {w}.", "", w) for w in ["red", "blue", "a long green thing", "x", "hello there", "yes", "no no"]]
    path.write_text("".join(json.dumps({"instruction": i, "input": x, "output": y}) + "\n" for i, x, y in rows))
    return path


def _eval_ok(argv, tmp_path, monkeypatch, capsys) -> tuple[int, str]:
    from arkd.cli.eval import main

    monkeypatch.chdir(tmp_path)
    hydra = [f"hydra.run.dir={tmp_path / 'hydra'}", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", ["arkd-eval", *argv, "bertscore.enabled=false", "progress=false", *hydra])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as err:
        code = err.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _counting_generate(monkeypatch, fail_at: int | None = None, error: type[BaseException] = KeyboardInterrupt):
    from arkd.evaluation import generation

    real, calls = generation.generate, []

    def generate(model, tokenizer, prompts, **kwargs):
        calls.append(len(prompts))
        if fail_at is not None and len(calls) == fail_at:
            raise error()
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(generation, "generate", generate)
    return calls


def test_arkd_eval_keeps_every_generated_row_when_interrupted_and_continues(
    tiny_model_dir, seven_rows, tmp_path, monkeypatch, capsys
):
    """Before: Ctrl-C (or a crash) lost every generation of the evaluation."""
    common = [f"model_path={tiny_model_dir}", f"datasets=[{seven_rows}]", "seeds=[1,2]", "batch_size=2",
              "decoding.max_new_tokens=6"]  # fmt: skip
    assert _eval_ok([*common, f"output_dir={tmp_path / 'straight'}"], tmp_path, monkeypatch, capsys)[0] == 0
    out = tmp_path / "out"
    calls = _counting_generate(monkeypatch, fail_at=3)  # two batches of seed 1 done, then Ctrl-C
    code, text = _eval_ok([*common, f"output_dir={out}"], tmp_path, monkeypatch, capsys)
    assert code == 130 and "generations.partial" in text
    assert sorted(p.name for p in out.iterdir()) == ["generations.partial"]  # nothing that looks complete
    monkeypatch.undo()
    calls = _counting_generate(monkeypatch)
    code, text = _eval_ok([*common, f"output_dir={out}"], tmp_path, monkeypatch, capsys)
    assert code == 0, text
    assert f"continuing an interrupted evaluation: 4 generated rows kept in {out / 'generations.partial'}" in text
    assert sum(calls) == 2 * 7 - 4  # only the rows not kept were generated
    assert (out / "generations.jsonl").read_bytes() == (tmp_path / "straight" / "generations.jsonl").read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["generations.jsonl", "results.json", "results.md"]


def test_arkd_eval_on_a_full_disk_keeps_the_generations_and_leaves_no_half_written_file(
    tiny_model_dir, seven_rows, tmp_path, monkeypatch, capsys
):
    """Before: every generation was lost and a truncated generations.jsonl was left looking complete."""
    import errno
    import os

    common = [f"model_path={tiny_model_dir}", f"datasets=[{seven_rows}]", "seeds=[1]", "batch_size=3",
              "decoding.max_new_tokens=6"]  # fmt: skip
    assert _eval_ok([*common, f"output_dir={tmp_path / 'straight'}"], tmp_path, monkeypatch, capsys)[0] == 0
    out = tmp_path / "out"
    real_fsync = os.fsync

    def full_disk(fd):
        if "generations.jsonl.tmp" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    code, text = _eval_ok([*common, f"output_dir={out}"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert text.strip().splitlines()[-1] == (
        f"arkd-eval: cannot write the results to {out}: no space left on the device; the 7 generated rows are kept "
        f"in {out / 'generations.partial'}, and the same command continues from them."
    )
    assert sorted(p.name for p in out.iterdir()) == ["generations.partial"]
    monkeypatch.undo()
    calls = _counting_generate(monkeypatch)
    assert _eval_ok([*common, f"output_dir={out}"], tmp_path, monkeypatch, capsys)[0] == 0
    assert calls == []  # nothing sampled again
    assert (out / "generations.jsonl").read_bytes() == (tmp_path / "straight" / "generations.jsonl").read_bytes()


# -- Smaller ones: one sentence each ----------------------------------------------------------------------------------


def test_arkd_eval_lists_the_valid_keys_for_an_unknown_one(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    argv = [f"model_path={tiny_model_dir}", f"datasets=[{data_file}]", "decoding.bogus=3"]
    code, err = _arkd_eval(argv, tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err == (
        "arkd-eval: decoding.bogus: no such key; expected one of the keys in decoding: clean_up_tokenization_spaces, "
        "greedy, max_new_tokens, max_prompt_tokens, no_repeat_ngram_size, temperature, top_k, top_p."
    )


def test_arkd_eval_says_a_directory_is_not_a_model(data_file, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    code, err = _arkd_eval([f"model_path={folder}", f"datasets=[{data_file}]"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err == (
        f"arkd-eval: model_path={folder} is not a model directory (it has no config.json); expected a directory "
        "written by save_pretrained (e.g. a run's final/ or best/) or a Hub name."
    )


def test_arkd_eval_says_a_truncated_weights_file_in_one_sentence(
    tiny_model_dir, data_file, tmp_path, monkeypatch, capsys
):
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _arkd_eval([f"model_path={cut}", f"datasets=[{data_file}]"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert err.startswith(f"arkd-eval: model_path={cut}: the model cannot be loaded (SafetensorError: "), err
    assert err.endswith("expected a complete model directory (a model.safetensors cut short or damaged?).")


def test_arkd_eval_on_a_full_disk_during_generation_keeps_the_rows_written(
    tiny_model_dir, seven_rows, tmp_path, monkeypatch, capsys
):
    import errno
    import os

    common = [f"model_path={tiny_model_dir}", f"datasets=[{seven_rows}]", "seeds=[1]", "batch_size=2",
              "decoding.max_new_tokens=6"]  # fmt: skip
    assert _eval_ok([*common, f"output_dir={tmp_path / 'straight'}"], tmp_path, monkeypatch, capsys)[0] == 0
    out, real_fsync, calls = tmp_path / "out", os.fsync, []

    def full_disk(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("rank0.jsonl"):
            calls.append(fd)
            if len(calls) == 2:  # the second batch finds the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    code, text = _eval_ok([*common, f"output_dir={out}"], tmp_path, monkeypatch, capsys)
    assert code == 2
    assert text.strip().splitlines()[-1] == (
        f"arkd-eval: cannot write the generated rows to {out / 'generations.partial' / 'rank0.jsonl'}: no space left "
        "on the device; the 2 rows written before are kept, and the same command continues from them."
    )
    monkeypatch.undo()
    code, text = _eval_ok([*common, f"output_dir={out}"], tmp_path, monkeypatch, capsys)
    assert code == 0 and "continuing an interrupted evaluation" in text
    assert (out / "generations.jsonl").read_bytes() == (tmp_path / "straight" / "generations.jsonl").read_bytes()
