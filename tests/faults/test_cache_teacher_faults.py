"""arkd-cache-teacher under bad arguments and failing disks: one sentence and an exit status, never a traceback
(before: argument errors and disk errors ended in tracebacks)."""

from __future__ import annotations

import errno

import pytest

BASE = ["config=tiny", "init_sft.teacher=null", "init_sft.student=null", "data.splits.n_train=32",
        "data.splits.n_validation=4", "data.splits.n_test=4", "trainer.progress=false", "reward=paired"]  # fmt: skip


def _run(argv, capsys) -> tuple[int, str]:
    from arkd.cli.cache_teacher import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["--no-progress", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    return info.value.code, lines[-1] if lines else ""


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shard-rows", "0"], "arkd-cache-teacher: --shard-rows: got 0, expected an integer >= 1."),
        (["--batch-size", "-2"], "arkd-cache-teacher: --batch-size: got -2, expected an integer >= 1."),
        (["--device", "gpu7"], "arkd-cache-teacher: --device: got 'gpu7', expected cpu, cuda or cuda:N."),
    ],
)
def test_bad_arguments_are_one_sentence(tmp_path, capsys, flags, message):
    code, line = _run([*flags, *BASE, f"cache_dir={tmp_path}", f"teacher.cache_dir={tmp_path / 'tc'}"], capsys)
    assert (code, line) == (2, message)


def test_an_unwritable_cache_directory_is_one_sentence(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "tc"
    code, line = _run([*BASE, f"cache_dir={tmp_path}", f"teacher.cache_dir={target}"], capsys)
    assert code == 1
    assert line == (
        f"arkd-cache-teacher: cannot write to the teacher cache directory (teacher.cache_dir) {target}: a part of the "
        "path is a file."
    )


def test_a_full_disk_while_writing_a_shard_is_one_sentence(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, line = _run([*BASE, f"cache_dir={tmp_path}", f"teacher.cache_dir={tmp_path / 'tc'}"], capsys)
    assert code == 1
    assert line.startswith(f"arkd-cache-teacher: {tmp_path / 'tc'}/")
    assert line.endswith(": no space left on the device.")
