"""Shared pytest fixtures and the GPU skip rule."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The protocol's real evaluation files (../shared/data); tests using it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for the test: tiny models and tensors run far faster on one thread than on threads that
    contend for a busy 2-core CI machine. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_world(
    *, vocab_size, corpus_size, examples, max_prompt_length, max_length, n_embd, n_positions, eval_teacher, with_rows
):
    """A tokenizer (BPE on the synthetic corpus, seed 0), a tokenized synthetic dataset (seed 3), a collator and a
    one-layer, two-head teacher (seed 1): ``(tokenizer, dataset, collate, teacher)``, and with ``with_rows`` every
    tokenized row as a fifth item."""
    from arkd.data import TokenizedDataset, TrainingCollator, generate_synthetic
    from arkd.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=vocab_size, corpus_size=corpus_size, seed=0)
    dataset = TokenizedDataset(
        generate_synthetic(examples, seed=3), tokenizer, max_prompt_length=max_prompt_length, max_length=max_length
    )
    collate = TrainingCollator(tokenizer.pad_token_id)
    teacher = build_tiny_model(len(tokenizer), n_layer=1, n_embd=n_embd, n_head=2, n_positions=n_positions, seed=1)
    if eval_teacher:
        teacher.eval()
    if with_rows:
        return tokenizer, dataset, collate, teacher, [dataset[i] for i in range(len(dataset))]
    return tokenizer, dataset, collate, teacher


def tiny_lm(*, texts, vocab_size, n_layer, n_head, n_embd, n_positions, seed, eval_model):
    """A BPE tokenizer trained on ``texts`` and a tiny GPT-2 of that vocabulary: ``(tokenizer, model)``."""
    from arkd.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(texts, vocab_size=vocab_size)
    model = build_tiny_model(
        len(tokenizer), n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions, seed=seed
    )
    return tokenizer, model.eval() if eval_model else model


TINY_BUILDERS = {"world": tiny_world, "lm": tiny_lm}


@pytest.fixture(scope="module")
def tiny(request):
    """The module's tiny models and data, built once per module from what the module declares in ``TINY``: a dict
    with ``kind`` (``"world"``: :func:`tiny_world`; ``"lm"``: :func:`tiny_lm`) and every argument of that builder,
    so that each module's sizes are written out where it is read."""
    spec = dict(request.module.TINY)
    return TINY_BUILDERS[spec.pop("kind")](**spec)
