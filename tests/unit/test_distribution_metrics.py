"""Distribution-level metrics (arkd.evaluation.distribution) against hand-computed cases and independent formulas."""

from __future__ import annotations

import math

import pytest
import torch

from arkd.evaluation.distribution import (
    distinct_n,
    head_tail_masses,
    self_bleu,
    teacher_forced_metrics,
    token_divergences,
)


def test_distinct_n_hand_computed():
    texts = ["a b a b", "a c"]
    # unigrams: a b a b a c -> 6 total, {a, b, c} 3 distinct
    assert distinct_n(texts, 1) == pytest.approx(100 * 3 / 6)
    # bigrams: (a b) (b a) (a b) | (a c) -> 4 total, 3 distinct; no bigram crosses the two texts
    assert distinct_n(texts, 2) == pytest.approx(100 * 3 / 4)
    assert distinct_n(["one"], 2) == 0.0
    with pytest.raises(ValueError, match="n >= 1"):
        distinct_n(texts, 0)
    with pytest.raises(TypeError, match="single string"):
        distinct_n("a b", 1)


def test_self_bleu_identical_and_disjoint_and_sacrebleu():
    import sacrebleu

    same = {"10": ["the cat sat on the mat"] * 2, "20": ["the cat sat on the mat"] * 2}
    assert self_bleu(same) == pytest.approx(100.0)
    disjoint = {"10": ["a b c d e"], "20": ["v w x y z"]}
    assert self_bleu(disjoint) == pytest.approx(0.0, abs=1e-9)
    three = [["the cat sat on the mat"], ["the cat sat on a mat"], ["a dog ran in the park"]]
    expected = (
        sacrebleu.sentence_bleu(three[0][0], [three[1][0], three[2][0]]).score
        + sacrebleu.sentence_bleu(three[1][0], [three[0][0], three[2][0]]).score
        + sacrebleu.sentence_bleu(three[2][0], [three[0][0], three[1][0]]).score
    ) / 3
    assert self_bleu(three) == pytest.approx(expected)
    assert self_bleu({"10": ["x"]}) is None
    with pytest.raises(ValueError, match="same prompts"):
        self_bleu([["a"], ["a", "b"]])


def test_token_divergences_match_torch_kl_div():
    torch.manual_seed(0)
    t, s = torch.randn(7, 11), torch.randn(7, 11)
    fkl, rkl = token_divergences(t, s)
    log_p, log_q = t.double().log_softmax(-1), s.double().log_softmax(-1)
    ref_f = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    ref_r = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(fkl, ref_f)
    torch.testing.assert_close(rkl, ref_r)
    zero_f, zero_r = token_divergences(t, t)
    assert float(zero_f.abs().max()) < 1e-12 and float(zero_r.abs().max()) < 1e-12


def test_head_tail_masses_hand_computed():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])  # cumulative 0.5, 0.8, 0.95: head {0, 1, 2} at p = 0.9
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    p_head, q_head, p_tail, q_tail = head_tail_masses(p.log(), q.log(), 0.9)
    assert float(p_head) == pytest.approx(0.95) and float(q_head) == pytest.approx(0.6)
    assert float(p_tail) == pytest.approx(0.05) and float(q_tail) == pytest.approx(0.4)
    # p = 0.8 exactly reached by the first two: the head stops there
    p_head, q_head, _, _ = head_tail_masses(p.log(), q.log(), 0.8)
    assert float(p_head) == pytest.approx(0.8) and float(q_head) == pytest.approx(0.3)
    # the head is never empty: p = 0.1 keeps the top token
    p_head, q_head, _, _ = head_tail_masses(p.log(), q.log(), 0.1)
    assert float(p_head) == pytest.approx(0.5) and float(q_head) == pytest.approx(0.1)
    # order of the vocabulary does not matter
    perm = torch.tensor([2, 0, 3, 1])
    assert float(head_tail_masses(p[perm].log(), q[perm].log(), 0.9)[1]) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="top_p"):
        head_tail_masses(p.log(), q.log(), 0.0)


class _TableLM(torch.nn.Module):
    """Next-token logits that depend only on the current token (a bigram table): easy to compute by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


class _CharTokenizer:
    """Characters a-e are ids 0-4; id 5 is the end of text."""

    eos_token_id = 5
    pad_token_id = 5
    bos_token_id = None

    def __len__(self):
        return 6

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) - ord("a") for c in t] for t in texts]}


def test_teacher_forced_metrics_against_naive_loop():
    torch.manual_seed(1)
    teacher, student = _TableLM(torch.randn(6, 6) * 2), _TableLM(torch.randn(6, 6))
    rows = [{"prompt": "ab", "references": ["cd", "e"]}, {"prompt": "c", "references": ["ba"]}]
    got = teacher_forced_metrics(student, teacher, _CharTokenizer(), rows, top_p=0.9, batch_size=2)
    # naive: every (prompt, reference) pair; positions predicting the reference tokens and the end of text
    f = r = ph = qh = pt = qt = 0.0
    n = 0
    for row in rows:
        for ref in row["references"]:
            ids = [ord(c) - 97 for c in row["prompt"] + ref] + [5]
            for pos in range(len(row["prompt"]) - 1, len(ids) - 1):
                p = teacher.table.detach()[ids[pos]].double().softmax(-1)
                q = student.table.detach()[ids[pos]].double().softmax(-1)
                f += float((p * (p / q).log()).sum())
                r += float((q * (q / p).log()).sum())
                order = p.argsort(descending=True).tolist()
                head, acc = [], 0.0
                for v in order:
                    if acc >= 0.9:
                        break
                    head.append(v)
                    acc += float(p[v])
                tail = [v for v in range(6) if v not in head]
                ph += float(p[head].sum())
                qh += float(q[head].sum())
                pt += float(p[tail].sum())
                qt += float(q[tail].sum())
                n += 1
    assert got["n_tokens"] == n == 3 + 2 + 3
    assert got["fkl"] == pytest.approx(f / n)
    assert got["rkl"] == pytest.approx(r / n)
    assert got["head_recall"] == pytest.approx(qh / ph)
    assert got["tail_recall"] == pytest.approx(qt / pt)
    same = teacher_forced_metrics(teacher, teacher, _CharTokenizer(), rows)
    assert same["fkl"] == pytest.approx(0.0, abs=1e-12) and same["head_recall"] == pytest.approx(1.0)
    assert math.isclose(same["tail_recall"], 1.0)
