"""Every shipped config composes through Hydra's compose API and its objects instantiate, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from arkd.cli.train import available_configs, check_overrides
from arkd.config_paths import config_dir
from arkd.data import held_out_splits
from arkd.errors import ConfigError
from arkd.recipes.build import build_model
from arkd.recipes.distill import run

CONFIG_DIR = config_dir()
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "config").glob("*.yaml"))


def _compose(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="module")
def local_gpt2(tmp_path_factory) -> Path:
    """A tiny GPT-2 and its tokenizer saved like a Hub checkpoint (stands in for gpt2 / gpt2-xl offline)."""
    from arkd.models import build_tiny_model, build_tiny_tokenizer, save_pretrained

    out = tmp_path_factory.mktemp("local_gpt2")
    tokenizer = build_tiny_tokenizer(vocab_size=300, corpus_size=200)
    save_pretrained(build_tiny_model(len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=64), tokenizer, out)
    return out


def _tiny_hub_model(family: str, vocab_size: int, seed: int = 0):
    """A random-init Qwen2 / Llama causal LM of the real families' classes, built from config (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[
        family
    ]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,  # as Qwen2.5-0.5B/1.5B and Llama-3.2-1B/3B
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


def _save_hub_like(out: Path, family: str, vocab_size: int, tokenizer) -> Path:
    from arkd.models import save_pretrained

    return save_pretrained(_tiny_hub_model(family, vocab_size), tokenizer, out)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from arkd.models import build_tiny_tokenizer

    return build_tiny_tokenizer(vocab_size=300, corpus_size=200)


@pytest.fixture(scope="module")
def local_families(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Tiny Qwen2 and Llama checkpoints with arkd's tiny tokenizer, saved like Hub checkpoints: the Qwen2 one pads
    its embedding beyond the tokenizer (as Qwen2.5 pads 151665 tokens to 151936 rows), the Llama one does not."""
    out = tmp_path_factory.mktemp("local_families")
    v = len(tiny_tokenizer)
    return {
        "qwen2": _save_hub_like(out / "qwen2", "qwen2", v + 84, tiny_tokenizer),
        "llama": _save_hub_like(out / "llama", "llama", v, tiny_tokenizer),
    }


FAMILY_OF = {
    "qwen2.5_": ("qwen2", "Qwen2ForCausalLM"),
    "llama3.2_": ("llama", "LlamaForCausalLM"),
    "smollm2_": ("gguf", "LlamaForCausalLM"),
}


@pytest.fixture(scope="module")
def local_gguf(tmp_path_factory) -> Path:
    """A tiny Llama with a ChatML tokenizer in a GGUF file (stands in for SmolLM2-135M-Instruct's)."""
    pytest.importorskip("gguf")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_gguf import tiny_chat_tokenizer, tiny_llama, write_gguf

    tokenizer = tiny_chat_tokenizer()
    return write_gguf(tiny_llama(len(tokenizer)), tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _family(name: str) -> tuple[str, str] | None:
    return next((family for prefix, family in FAMILY_OF.items() if name.startswith(prefix)), None)


@pytest.fixture(scope="module")
def dolly_like(tmp_path_factory) -> dict[str, Path]:
    """Three small JSONL files in the MiniLLM schema standing in for the Dolly pool, validation and test sets."""
    from arkd.data import generate_synthetic, write_jsonl

    out = tmp_path_factory.mktemp("dolly_like")
    rows = generate_synthetic(30, seed=11)
    return {
        "train": write_jsonl(rows[:20], out / "train.jsonl"),
        "validation": write_jsonl(rows[20:25], out / "valid.jsonl"),
        "test": write_jsonl(rows[25:], out / "test.jsonl"),
    }


def test_experiment_list_is_complete():
    expected = {"tiny", "gpt2_120m", "gpt2_340m", "gpt2_760m", "gpt2_xl_sft", "gpt2_120m_sft"}
    assert expected <= set(EXPERIMENTS)
    assert available_configs() == EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_opens_with_its_description(name):
    lines = (CONFIG_DIR / "config" / f"{name}.yaml").read_text().splitlines()
    header = [line for line in lines[:20] if line.startswith("#") and "@package" not in line]
    text = " ".join(header).lower()
    assert len(header) >= 5, f"{name}.yaml must open with a comment describing the experiment"
    assert f"config={name}" in text, "the launch command"
    assert "expected" in text and "hardware" in text.replace("sized for", "hardware")


CONFIG_FILES = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_lines_fit_120_columns(path):
    long = [n for n, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 120]
    assert not long, f"{path.relative_to(CONFIG_DIR)}: lines {long} are longer than 120 columns"


def test_size_experiments_share_a_base():
    # The GPT-2 KD and SFT experiments hold only their deltas; the rest is configs/base/dolly_{kd,sft}.yaml.
    for name in EXPERIMENTS:
        if not name.startswith("gpt2_"):
            continue
        text = (CONFIG_DIR / "config" / f"{name}.yaml").read_text()
        base = "dolly_sft" if name.endswith("_sft") else "dolly_kd"
        assert f"- /base/{base}" in text
        assert len([line for line in text.splitlines() if line and not line.startswith("#")]) <= 25


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_instantiates(name, local_gpt2, local_families, dolly_like, request):
    overrides = [f"config={name}", "output_dir=unused"]
    cfg = _compose(*overrides)
    synthetic = ("arkd.data.synthetic.synthetic_splits", "arkd.data.synthetic.tradeoff_splits")
    if cfg.data.splits._target_ not in synthetic:  # Dolly: offline stand-ins
        overrides += [
            f"data.splits.train.source={dolly_like['train']}",
            "data.splits.train.format=auto",
            f"data.splits.validation.source={dolly_like['validation']}",
            f"data.splits.test.source={dolly_like['test']}",
        ]
    family = _family(name)
    if family is not None and family[0] == "gguf":  # a GGUF teacher and a student pruned from it: a tiny GGUF file
        local = request.getfixturevalue("local_gguf")
        overrides += [f"tokenizer.name_or_path={local}", f"teacher.name_or_path={local}", f"model.teacher={local}"]
        overrides += ["model.layers=2", f"cache_dir={request.getfixturevalue('tmp_path')}"]
    elif cfg.tokenizer._target_ == "arkd.models.load_tokenizer":  # Hub names: tiny models of the same family
        local = local_families[family[0]] if family else local_gpt2
        overrides += [f"tokenizer.name_or_path={local}", f"model.name_or_path={local}"]
        if cfg.teacher is not None:
            overrides.append(f"teacher.name_or_path={local}")
    if name in ("tiny", "tiny_tradeoff"):
        overrides += ["data.splits.n_train=50"]
    cfg = _compose(*overrides)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves

    tokenizer = instantiate(cfg.tokenizer)
    splits = instantiate(cfg.data.splits)
    assert splits["train"] and splits["validation"] and splits["test"]
    student = build_model(cfg.model, tokenizer)
    assert student(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] >= len(tokenizer)
    if family is not None:
        assert type(student).__name__ == family[1]
    if cfg.teacher is not None:
        teacher = build_model(cfg.teacher, tokenizer)
        assert teacher is not None
        if family is not None:
            assert type(teacher).__name__ == family[1]
    if cfg.loss is not None:
        loss = instantiate(cfg.loss)
        assert loss.reduction == "sum"
        if getattr(loss, "takes_alpha", False):
            strategy = instantiate(cfg.policy)
            assert strategy.granularity in ("batch", "sequence", "token")
            reward = instantiate(cfg.reward)
            assert reward.interval >= 1 and reward.candidates >= 1
            assert cfg.probe.enabled in ("auto", True, False)
    else:
        assert cfg.trainer.ce_weight > 0 and cfg.teacher is None  # SFT
    optimizer = instantiate(cfg.optimizer)(params=student.parameters())
    assert isinstance(optimizer, torch.optim.Optimizer)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIG_DIR / "loss").glob("*.yaml")))
def test_every_loss_option_instantiates(option):
    cfg = _compose(f"loss={option}")
    if cfg.loss is None:
        assert cfg.trainer.ce_weight == 1.0 and cfg.trainer.kd_weight == 0.0
        return
    loss = instantiate(cfg.loss)
    s, t = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    extra = {"alpha": torch.tensor(0.5)} if loss.takes_alpha else {}
    if getattr(loss, "needs_target_ids", False):
        extra["target_ids"] = torch.zeros(2, 3, dtype=torch.long)
    assert torch.isfinite(loss(s, t, mask, **extra))


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONFIG_DIR / "policy").glob("*.yaml")))
def test_every_policy_option_selects_alpha(option):
    from arkd.policy import StepContext
    from arkd.policy.features import compute_features

    instantiate(_compose("config=tiny", f"policy={option}").policy)  # a baseline is an override of an experiment
    strategy = instantiate(_compose("config=gpt2_120m", f"policy={option}").policy)
    s, t = torch.randn(2, 4, 11), torch.randn(2, 4, 11)
    mask = torch.ones(2, 4, dtype=torch.bool)
    features = compute_features(s, t, mask, **strategy.feature_options)
    alpha = strategy.select(StepContext(features=features, progress=0.5, step=3, lookahead=lambda a: -abs(a - 0.75)))
    assert ((alpha >= 0) & (alpha <= 1)).all()


def test_baselines_are_overrides():
    fkl = _compose("config=gpt2_120m", "policy=constant", "policy.alpha=1.0")
    assert fkl.policy._target_ == "arkd.policy.ConstantAlpha" and fkl.policy.alpha == 1.0
    assert _compose("config=gpt2_120m", "policy=akl").policy._target_ == "arkd.policy.AKLHeuristic"
    assert _compose("config=gpt2_120m", "loss=generalized_jsd").loss._target_ == "arkd.losses.GeneralizedJSDLoss"


def test_unknown_config_lists_the_available_ones_in_one_sentence():
    message = check_overrides(["config=nope"])
    assert message.startswith("unknown config 'nope'") and "tiny" in message and "gpt2_120m" in message
    assert "\n" not in message


def test_bad_override_is_one_sentence():
    message = check_overrides(["config=tiny", "trainer.no_such_key=3"])
    assert message is not None and "no_such_key" in message and "\n" not in message
    assert check_overrides(["config=tiny", "trainer.max_steps=5"]) is None
    assert check_overrides(["-m", "config=tiny", "policy=constant,learned"]) is None  # sweeps are left to Hydra


def test_missing_teacher_names_the_key():
    cfg = _compose("config=gpt2_120m", "output_dir=unused")
    with pytest.raises(ConfigError, match=r"teacher\.name_or_path="):
        run(cfg)
    cfg = _compose("config=gpt2_120m", "teacher=none", "output_dir=unused")
    with pytest.raises(ConfigError, match=r"teacher="):
        run(cfg)


def test_held_out_splits_drop_leaking_training_rows():
    from arkd.data import generate_synthetic

    rows = generate_synthetic(40, seed=5)
    splits = held_out_splits(rows, rows[:5], rows[5:8])
    held = {r.prompt for r in rows[:8]}
    assert splits["train"] and all(r.prompt not in held for r in splits["train"])
    assert len(splits["train"]) == sum(r.prompt not in held for r in rows)


def test_resolved_config_is_json_serialisable():
    cfg = _compose("config=tiny", "output_dir=unused")
    json.dumps(OmegaConf.to_container(cfg, resolve=True))


LAUNCH_DIR = Path(__file__).resolve().parents[2] / "launch" / "accelerate"


def test_accelerate_launch_files_are_not_hydra_options():
    # `accelerate launch --config_file` files live outside the Hydra tree: they must not compose as a config group.
    assert not (CONFIG_DIR / "accelerate").exists()
    message = check_overrides(["config=tiny", "+accelerate=fsdp"])
    assert message is not None and "accelerate" in message


@pytest.mark.parametrize("path", sorted(LAUNCH_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_launch_files_load(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.mixed_precision == "bf16" and config.num_processes >= 1
    expected = {
        "single_gpu": "NO",
        "multi_gpu_ddp": "MULTI_GPU",
        "multi_node": "MULTI_GPU",
        "fsdp": "FSDP",
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
    }
    assert str(config.distributed_type).endswith(expected[path.stem])
    if path.stem.startswith("deepspeed"):
        assert config.deepspeed_config["zero_stage"] == int(path.stem[-1])
    assert f"--config_file launch/accelerate/{path.name}" in path.read_text()  # the launch command is documented


def test_best_mode_is_explicit_and_checked_against_the_metric():
    assert _compose("config=tiny").trainer.best_mode == "max"
    sft = _compose("config=gpt2_120m_sft")
    assert (sft.trainer.best_metric, sft.trainer.best_mode) == ("val_loss", "min")
    message = check_overrides(["config=tiny", "trainer.best_metric=val_loss"])
    assert message == (
        "trainer.best_mode: got 'max' for trainer.best_metric=val_loss, expected 'min' (lower is better)."
    )
    assert check_overrides(["config=tiny", "trainer.best_metric=val_loss", "trainer.best_mode=min"]) is None
    assert "one of max, min" in check_overrides(["config=tiny", "trainer.best_mode=up"])


def test_one_temperature_from_the_loss():
    from arkd.recipes.distill import trainer_config

    cfg = _compose("config=tiny", "loss.temperature=2.0", "output_dir=unused")
    assert trainer_config(cfg, output_dir="x").temperature == 2.0
    assert "temperature" not in _compose("config=tiny").trainer
    assert "nothing reads this key" in check_overrides(["config=tiny", "+trainer.temperature=2.0"])


def test_todays_model_pairs_name_the_hub_models():
    qwen = _compose("config=qwen2.5_0.5b")
    assert (qwen.model.name_or_path, qwen.teacher.name_or_path) == ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-1.5B")
    assert qwen.tokenizer.name_or_path.startswith("Qwen/Qwen2.5-")
    llama = _compose("config=llama3.2_1b")
    assert (llama.model.name_or_path, llama.teacher.name_or_path) == (
        "meta-llama/Llama-3.2-1B",
        "meta-llama/Llama-3.2-3B",
    )
    for cfg in (qwen, llama):
        assert cfg.model._target_ == cfg.teacher._target_ == "arkd.models.load_model"
        assert cfg.trainer.fused_linear and cfg.loss._target_ == "arkd.losses.BidirectionalKLLoss"
        assert cfg.data.splits.train.source == "databricks/databricks-dolly-15k"  # the base's Dolly pool
    text = " ".join((CONFIG_DIR / "config" / f"{n}.yaml").read_text() for n in ("qwen2.5_0.5b", "llama3.2_1b"))
    assert "- /base/dolly_kd" in text and text.count("no published figure checked") == 2


def _pair_run_overrides(name: str, tokenizer_dir: Path, student: Path, teacher: Path, dolly_like, out: Path):
    return [
        f"config={name}",
        f"output_dir={out}",
        f"tokenizer.name_or_path={tokenizer_dir}",
        f"model.name_or_path={student}",
        f"teacher.name_or_path={teacher}",
        f"data.splits.train.source={dolly_like['train']}",
        "data.splits.train.format=auto",
        f"data.splits.validation.source={dolly_like['validation']}",
        f"data.splits.test.source={dolly_like['test']}",
        "data.batch_size=4",
        "data.max_length=192",
        "data.max_prompt_length=160",
        "data.group_by_length=null",
        "trainer.precision=fp32",
        "trainer.cpu=true",
        "trainer.max_steps=2",
        "reward=paired",  # 2 steps on 20 rows: the horizon reward holds out 64
        "trainer.grad_accum=1",
        "trainer.warmup_steps=0",
        "trainer.eval_interval=0",
        "trainer.save_interval=0",
        "trainer.log_interval=1",
        "trainer.progress=false",
        "validation.subset=2",
        "validation.max_new_tokens=2",
        "report.enabled=false",
    ]


@pytest.mark.parametrize("name", ["qwen2.5_0.5b", "llama3.2_1b"])
def test_padded_vocabulary_is_sliced_at_start(name, tmp_path, tiny_tokenizer, dolly_like):
    """Teacher and student padded differently beyond the tokenizer (the trainer's losses refuse logits of unequal
    widths): the run keeps len(tokenizer) logits of each, exactly the padded models' first columns."""
    from arkd.models import load_model
    from arkd.run_log import read_metrics

    family = _family(name)[0]
    v = len(tiny_tokenizer)
    student = _save_hub_like(tmp_path / "student", family, v + 28, tiny_tokenizer)  # 128-row multiple, say
    teacher = _save_hub_like(tmp_path / "teacher", family, v + 84, tiny_tokenizer)
    summary = run(_compose(*_pair_run_overrides(name, student, student, teacher, dolly_like, tmp_path / "run")))
    assert summary["steps"] == 2
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("split") != "validation"]
    assert [r["step"] for r in rows if "loss" in r][-1] == 2 and all(
        torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r
    )

    final = load_model(tmp_path / "run" / "final")
    assert final.config.vocab_size == v and final.get_output_embeddings().weight.shape[0] == v
    assert type(final).__name__ == _family(name)[1]

    # The slice is exact: the padded model's first V logits are the sliced model's logits.
    from arkd.models import slice_to_vocab

    padded = load_model(teacher)
    ids = torch.tensor([[1, 5, 9, 40]])
    with torch.no_grad():
        full = padded(input_ids=ids).logits
        sliced = slice_to_vocab(padded, v)(input_ids=ids).logits
    assert full.shape[-1] == v + 84 and sliced.shape[-1] == v
    torch.testing.assert_close(sliced, full[..., :v], rtol=0, atol=0)
    assert padded.get_output_embeddings().weight is padded.get_input_embeddings().weight  # still tied


def test_report_evaluates_every_model_on_the_tokenizers_vocabulary(tmp_path, tiny_tokenizer, dolly_like, monkeypatch):
    # The final report rebuilds the student before training from its config: padded rows dropped there too.
    import arkd.report

    v = len(tiny_tokenizer)
    student = _save_hub_like(tmp_path / "student", "qwen2", v + 28, tiny_tokenizer)
    teacher = _save_hub_like(tmp_path / "teacher", "qwen2", v + 84, tiny_tokenizer)
    widths: dict[str, int] = {}
    original = arkd.report._evaluate

    def record(model, tokenizer, examples, cfg, label, **kwargs):
        with torch.no_grad():
            widths[label] = model(input_ids=torch.tensor([[1, 2]], device=model.device)).logits.shape[-1]
        return original(model, tokenizer, examples, cfg, label, **kwargs)

    monkeypatch.setattr(arkd.report, "_evaluate", record)
    overrides = _pair_run_overrides("qwen2.5_0.5b", student, student, teacher, dolly_like, tmp_path / "run")
    overrides = [o for o in overrides if o != "report.enabled=false"]
    overrides += ["report.enabled=true", "report.seeds=[10]", "report.subset=2", "report.max_new_tokens=2"]
    run(_compose(*overrides))
    assert len(widths) == 3 and set(widths.values()) == {v}, widths


def test_vocabulary_mismatch_is_refused_in_one_sentence(tmp_path, tiny_tokenizer, dolly_like):
    v = len(tiny_tokenizer)
    student = _save_hub_like(tmp_path / "student", "qwen2", v + 84, tiny_tokenizer)
    teacher = _save_hub_like(tmp_path / "teacher", "qwen2", v + 2000, tiny_tokenizer)  # another tokenizer's model
    overrides = _pair_run_overrides("qwen2.5_0.5b", student, student, teacher, dolly_like, tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        run(_compose(*overrides))
    message = str(err.value)
    # refused before any model is built or trained, naming the config key (arkd.recipes.limits)
    assert message.startswith(f"teacher.name_or_path={teacher}: ") and f"{v + 2000} vocabulary rows" in message
    assert f"the tokenizer {v} tokens" in message
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step

    small = _save_hub_like(tmp_path / "small", "qwen2", v - 10, tiny_tokenizer)  # fewer rows than tokens
    with pytest.raises(ConfigError, match=rf"^model.name_or_path=.*: the model has {v - 10} vocabulary rows"):
        run(_compose(*_pair_run_overrides("qwen2.5_0.5b", student, small, student, dolly_like, tmp_path / "r2")))


def test_policy_learned_defaults_to_the_horizon_reward_and_the_probe_auto_rule():
    """The learned policy's default reward is the horizon reward (issue 21's evidence, docs/results.md); probe
    ``enabled: auto`` is on under a one-step reward, off under the branching reward unless it asks at a horizon."""
    from arkd.recipes.distill import _build_probe
    from arkd.reward import HorizonReward, PairedReward

    cfg = _compose("config=tiny")
    assert cfg.reward._target_ == "arkd.reward.HorizonReward"
    strategy, reward = instantiate(cfg.policy), instantiate(cfg.reward)
    assert isinstance(reward, HorizonReward) and reward.horizon == 32 and reward.candidates == 2
    assert _build_probe(cfg, strategy, reward) is None
    assert _build_probe(_compose("config=tiny", "probe.horizon=8"), strategy, reward).horizon == 8
    assert _build_probe(_compose("config=tiny", "probe.enabled=true"), strategy, reward) is not None
    paired = _compose("config=tiny", "reward=paired")
    assert _build_probe(paired, strategy, instantiate(paired.reward)) is not None
    assert isinstance(instantiate(paired.reward), PairedReward)
    off = _compose("config=tiny", "reward=paired", "probe.enabled=false")
    assert _build_probe(off, strategy, PairedReward()) is None
    fixed = _compose("config=tiny", "policy=constant")
    assert _build_probe(fixed, instantiate(fixed.policy), None) is None
    assert _compose("config=smollm2_dolly").reward._target_ == "arkd.reward.PairedReward"  # 16 steps: half a horizon
