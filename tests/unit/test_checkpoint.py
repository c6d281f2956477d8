"""Verified checkpoints (arkd.checkpoint): manifests with SHA-256, corrupt checkpoints skipped with one sentence,
stale temporary directories cleaned, rotation that never deletes the newest healthy checkpoint."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from arkd import checkpoint as ckpt


def _write(root, step, *, healthy=True, keep_last=None, value=1.0):
    return ckpt.write_checkpoint(
        root,
        step,
        model_state={"w": torch.full((64,), value)},
        state={"step": step},
        rng_states=[ckpt.capture_rng_state()],
        keep_last=keep_last,
        healthy=healthy,
        config_text=f"seed: {step}\n",
    )


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    path = _write(tmp_path, 3)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    assert manifest["step"] == 3 and manifest["healthy"] is True
    on_disk = {p.name for p in path.iterdir()} - {ckpt.MANIFEST, ckpt.COMPLETE}
    assert set(manifest["files"]) == on_disk == {"model.safetensors", "state.pt", "rng_rank0.pt", "config.yaml"}
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(path) is None
    assert ckpt.read_config_text(path) == "seed: 3\n"


def test_flipped_byte_and_truncation_are_caught_and_the_previous_one_is_used(tmp_path):
    _write(tmp_path, 2)
    newest = _write(tmp_path, 4)
    weights = newest / ckpt.MODEL_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: the file still parses
    weights.write_bytes(bytes(data))
    assert ckpt.verify_checkpoint(newest) == "model.safetensors fails its SHA-256 checksum"
    assert ckpt.latest_checkpoint(tmp_path) == newest  # without verify: only completeness
    messages = []
    assert ckpt.latest_checkpoint(tmp_path, verify=True, on_corrupt=messages.append) == tmp_path / "step_0000002"
    assert messages == [
        f"checkpoint {newest} is corrupt (model.safetensors fails its SHA-256 checksum); "
        "using the previous good one, step_0000002."
    ]

    state = tmp_path / "step_0000002" / ckpt.STATE_FILE
    size = state.stat().st_size
    state.write_bytes(state.read_bytes()[: size // 2])
    messages.clear()
    assert ckpt.latest_checkpoint(tmp_path, verify=True, on_corrupt=messages.append) is None
    assert messages[1].endswith(f"(state.pt has {size // 2} bytes, expected {size}); no older good checkpoint is left.")


def test_missing_file_and_checkpoints_without_manifest(tmp_path):
    path = _write(tmp_path, 1)
    (path / "rng_rank0.pt").unlink()
    assert ckpt.verify_checkpoint(path) == "rng_rank0.pt is missing"
    # A checkpoint of an older arkd (no manifest) is accepted when complete.
    old = _write(tmp_path, 2)
    (old / ckpt.MANIFEST).unlink()
    assert ckpt.verify_checkpoint(old) is None and ckpt.is_healthy(old)


def test_clean_stale_removes_temporaries_and_puts_back_a_checkpoint_caught_between_renames(tmp_path):
    _write(tmp_path, 2)
    (tmp_path / ".tmp_step_0000004_123").mkdir()
    (tmp_path / ".old_step_0000002_77").mkdir()  # step_0000002 exists: a leftover
    caught = _write(tmp_path, 6)
    caught.rename(tmp_path / ".old_step_0000006_88")  # killed after moving step_6 aside, before the new one landed
    (tmp_path / "unrelated").mkdir()
    removed = ckpt.clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == [".old_step_0000002_77", ".tmp_step_0000004_123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000002", "step_0000006", "unrelated"]
    assert ckpt.verify_checkpoint(tmp_path / "step_0000006") is None


def test_rotation_never_deletes_the_newest_healthy_checkpoint(tmp_path):
    _write(tmp_path, 1)
    _write(tmp_path, 2)
    for step in (3, 4, 5):
        _write(tmp_path, step, healthy=False, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 4, 5]
    _write(tmp_path, 6, keep_last=2)  # healthy again: the old good one may go
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [5, 6]


def test_rewriting_a_step_replaces_it_whole(tmp_path):
    _write(tmp_path, 2, value=1.0)
    path = _write(tmp_path, 2, value=3.0)
    assert ckpt.verify_checkpoint(path) is None
    assert torch.equal(ckpt.load_weights(path / ckpt.MODEL_FILE)["w"], torch.full((64,), 3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["step_0000002"]


@pytest.mark.parametrize("name", ["state.pt", "manifest.json"])
def test_garbage_files_are_reported_not_raised(tmp_path, name):
    path = _write(tmp_path, 1)
    (path / name).write_text("garbage")
    assert ckpt.verify_checkpoint(path) is not None
