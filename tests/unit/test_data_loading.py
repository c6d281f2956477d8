"""Deterministic shuffling, distributed shards and crash-resume of the data loader."""

from __future__ import annotations

import pytest
import torch

from arkd.data import ResumableSampler, build_dataloader


class Items(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def collate(items):
    return {"input_ids": torch.tensor(items)}


def flat(loader) -> list[int]:
    return [i for batch in loader for i in batch["input_ids"].tolist()]


def test_epoch_order_is_the_seeded_permutation():
    loader = build_dataloader(Items(10), batch_size=3, collate_fn=collate, seed=7, rank=0, world_size=1)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(7)).tolist()
    assert flat(loader) == expected
    expected_next = torch.randperm(10, generator=torch.Generator().manual_seed(8)).tolist()
    assert flat(loader) == expected_next  # a full pass moves on to the next epoch
    assert loader.state_dict()["epoch"] == 2


def test_same_seed_same_order_other_seed_other_order():
    def order(seed):
        return flat(build_dataloader(Items(50), batch_size=4, collate_fn=collate, seed=seed, rank=0, world_size=1))

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == list(range(50))


def test_no_shuffle_visits_in_order():
    loader = build_dataloader(Items(5), batch_size=2, collate_fn=collate, shuffle=False, rank=0, world_size=1)
    assert [b["input_ids"].tolist() for b in loader] == [[0, 1], [2, 3], [4]]


def test_set_epoch_selects_the_permutation():
    loader = build_dataloader(Items(10), batch_size=4, collate_fn=collate, seed=0, rank=0, world_size=1)
    loader.set_epoch(3)
    assert flat(loader) == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()


@pytest.mark.parametrize(("n", "world", "drop_last"), [(10, 3, False), (10, 3, True), (12, 4, False), (2, 3, False)])
def test_distributed_shards_are_disjoint_and_cover(n, world, drop_last):
    shards = [
        ResumableSampler(n, seed=5, rank=r, world_size=world, drop_last=drop_last).epoch_indices(0)
        for r in range(world)
    ]
    sizes = {len(s) for s in shards}
    assert len(sizes) == 1  # every rank takes the same number of steps
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
    interleaved = [shards[r][k] for k in range(len(shards[0])) for r in range(world)]
    if drop_last:
        assert interleaved == perm[: n // world * world]
    else:
        assert interleaved[:n] == perm and len(interleaved) == -(-n // world) * world
        assert set(interleaved) == set(range(n))


def test_resume_mid_epoch_gives_the_same_remaining_batches():
    def make():
        return build_dataloader(Items(23), batch_size=4, collate_fn=collate, seed=11, rank=0, world_size=1)

    reference = make()
    first_epoch = [b["input_ids"].tolist() for b in reference]
    second_epoch = [b["input_ids"].tolist() for b in reference]

    run = make()
    seen = []
    for step, batch in enumerate(run):
        seen.append(batch["input_ids"].tolist())
        if step == 2:
            state = run.state_dict()  # the checkpoint after step 3
            break
    assert state == {"epoch": 0, "position": 12, "seed": 11, "world_size": 1}

    resumed = make()  # a fresh process after the crash
    resumed.load_state_dict(state)
    rest = [b["input_ids"].tolist() for b in resumed]
    assert seen + rest == first_epoch
    assert [b["input_ids"].tolist() for b in resumed] == second_epoch


def test_breaking_out_and_iterating_again_continues():
    loader = build_dataloader(Items(9), batch_size=2, collate_fn=collate, seed=0, rank=0, world_size=1)
    full = torch.randperm(9, generator=torch.Generator().manual_seed(0)).tolist()
    got = []
    for batch in loader:
        got += batch["input_ids"].tolist()
        break
    got += flat(loader)
    assert got == full


def test_state_counts_delivered_samples_with_worker_prefetch():
    loader = build_dataloader(Items(40), batch_size=4, collate_fn=collate, seed=2, rank=0, world_size=1, num_workers=1)
    iterator = iter(loader)
    next(iterator)
    next(iterator)
    assert loader.state_dict()["position"] == 8  # not what the worker has already prefetched
    iterator.close()


def test_resume_on_another_rank_layout_is_an_error():
    loader = build_dataloader(Items(8), batch_size=2, collate_fn=collate, seed=0, rank=0, world_size=1)
    other = build_dataloader(Items(8), batch_size=2, collate_fn=collate, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="saved with world_size 1, this run has 2"):
        other.load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="sampler state has seed 0 but this sampler has seed 3"):
        build_dataloader(Items(8), batch_size=2, collate_fn=collate, seed=3, rank=0, world_size=1).load_state_dict(
            loader.state_dict()
        )
    with pytest.raises(ValueError, match="sampler state is missing 'position'"):
        loader.load_state_dict({"epoch": 1})
    with pytest.raises(ValueError, match=r"sampler position 99 is outside 0\.\.8"):
        loader.load_state_dict({"epoch": 0, "position": 99})


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="expected 0 <= rank < world_size, got rank=2 and world_size=2"):
        ResumableSampler(4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least one sample"):
        ResumableSampler(0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        build_dataloader(Items(3), batch_size=0, collate_fn=collate)


def test_rank_and_world_size_from_the_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = build_dataloader(Items(6), batch_size=2, collate_fn=collate, seed=4)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(4)).tolist()
    assert flat(loader) == perm[1::2]


def test_iterators_never_draw_from_the_global_generator():
    """A resumed run creates one more iterator than the uninterrupted run; the global generator (dropout) must not
    notice. DataLoader draws each iterator's base seed from the global generator unless the loader has its own."""
    loader = build_dataloader(Items(10), batch_size=2, collate_fn=collate, seed=5, rank=0, world_size=1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for _ in range(3):
        next(iter(loader))
    flat(loader)
    assert torch.equal(torch.get_rng_state(), state)


def test_the_loader_generator_is_reseeded_from_the_position():
    """Worker seeds come from ``loader.generator``: seeded from (seed, epoch, position), a resumed loader's fresh
    iterator gets the seed the uninterrupted loader had at that position."""
    make = lambda: build_dataloader(Items(10), batch_size=2, collate_fn=collate, seed=5, rank=0, world_size=1)  # noqa: E731
    straight = make()
    iterator = iter(straight)
    next(iterator)
    iterator.close()  # breaking out: the next iteration continues at position 2
    next(iter(straight))
    seed_at_2 = straight.generator.initial_seed()
    resumed = make()
    resumed.load_state_dict({"epoch": 0, "position": 2, "seed": 5, "world_size": 1})
    next(iter(resumed))
    assert resumed.generator.initial_seed() == seed_at_2
    fresh = make()
    next(iter(fresh))
    assert fresh.generator.initial_seed() != seed_at_2  # position 0 and position 2 differ


def test_length_grouped_sampler_is_a_resumable_permutation_with_sorted_groups():
    from arkd.data.loading import ResumableSampler

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (103,), generator=g).tolist()
    for rank in (0, 1):
        sampler = ResumableSampler(103, seed=3, rank=rank, world_size=2, lengths=lengths, group_size=8)
        plain = ResumableSampler(103, seed=3, rank=rank, world_size=2)
        order = sampler.epoch_indices(0)
        assert sorted(order) == sorted(plain.epoch_indices(0))  # the same samples of this rank, each once
        for start in range(0, len(order), 8):
            group = [lengths[i] for i in order[start : start + 8]]
            assert group == sorted(group, reverse=True)
        assert order != sampler.epoch_indices(1)  # a new shuffle each epoch
        sampler.load_state_dict({"epoch": 0, "position": 20, "seed": 3, "world_size": 2})
        assert list(sampler) == order[20:]  # resume skips exactly the delivered samples
    with pytest.raises(ValueError, match="both lengths"):
        ResumableSampler(10, lengths=[1] * 10)
    with pytest.raises(ValueError, match="one per sample"):
        ResumableSampler(10, lengths=[1] * 9, group_size=4)


def test_length_grouping_cuts_padding():
    from arkd.data import TokenizedDataset, TrainingCollator, build_dataloader, generate_synthetic
    from arkd.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(vocab_size=300, corpus_size=500, seed=0)
    dataset = TokenizedDataset(generate_synthetic(400, seed=1), tokenizer, max_prompt_length=120, max_length=160)
    collate = TrainingCollator(tokenizer.pad_token_id)

    def padding_share(**options) -> float:
        loader = build_dataloader(dataset, batch_size=8, collate_fn=collate, seed=0, rank=0, world_size=1, **options)
        pad = total = 0
        for batch in loader:
            pad += int((batch["attention_mask"] == 0).sum())
            total += batch["attention_mask"].numel()
        return pad / total

    plain, grouped = padding_share(), padding_share(group_by_length=10)
    assert grouped < 0.5 * plain, (plain, grouped)
    with pytest.raises(ValueError, match="group_by_length must be null or >= 1"):
        padding_share(group_by_length=0)
