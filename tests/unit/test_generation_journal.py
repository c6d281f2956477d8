"""arkd-eval's journal of generations (arkd.evaluation.journal): rows of the same evaluation are kept, another
evaluation's are refused, a line cut by an interrupted write is dropped, and the journal changes no generation."""

from __future__ import annotations

import json

from arkd.evaluation.journal import GenerationJournal


def test_the_same_evaluation_keeps_its_rows_and_another_is_refused(tmp_path):
    journal = GenerationJournal(tmp_path)
    assert journal.claim({"model": "a"}, overwrite=False) is None
    journal.append("dolly", 10, [(0, "x"), (3, "y")])
    again = GenerationJournal(tmp_path)
    assert again.claim({"model": "a"}, overwrite=False) is None and again.load() == 2
    assert again.done == {("dolly", 10, 0): "x", ("dolly", 10, 3): "y"}
    other = GenerationJournal(tmp_path)
    problem = other.claim({"model": "b"}, overwrite=False)
    assert problem is not None and "another, interrupted evaluation" in problem
    assert other.claim({"model": "b"}, overwrite=True) is None and other.load() == 0


def test_a_line_cut_by_an_interrupted_write_is_generated_again(tmp_path):
    journal = GenerationJournal(tmp_path)
    journal.claim({}, overwrite=False)
    journal.append("d", 1, [(0, "kept")])
    with open(journal.folder / "rank0.jsonl", "a") as handle:  # a write cut before its newline
        handle.write(json.dumps({"dataset": "d", "seed": 1, "row": 1, "generation": "cut"}))
    assert journal.load() == 1 and ("d", 1, 1) not in journal.done
    journal.append("d", 1, [(1, "again")])  # starts its own line: the cut one was dropped on load
    assert GenerationJournal(tmp_path).load() == 2


def test_the_wrapped_generation_reuses_rows_and_calls_in_batches_longest_first(tmp_path):
    class Tok:
        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[1] * len(t.split()) for t in texts]}

    calls = []

    def generate_fn(prompts, *, seed, row_ids, progress, desc):
        calls.append(list(row_ids))
        return [f"{seed}:{r}" for r in row_ids]

    journal = GenerationJournal(tmp_path)
    journal.claim({}, overwrite=False)
    journal.append("d", 5, [(2, "5:2")])
    wrapped = journal.wrap(generate_fn, "d", tokenizer=Tok(), max_prompt_tokens=100, chunk=2)
    prompts = ["a", "a b c", "a b", "a b c d", "a"]
    assert wrapped(prompts, seed=5, row_ids=range(5), progress=False) == [f"5:{r}" for r in range(5)]
    assert calls == [[3, 1], [0, 4]]  # row 2 kept; longest first, two rows a call
    assert GenerationJournal(tmp_path).load() == 5
