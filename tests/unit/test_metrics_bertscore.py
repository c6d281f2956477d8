"""BERTScore with a tiny BERT built and saved here, against a naive greedy-matching reference and bert_score itself."""

from __future__ import annotations

import pytest
import torch

from arkd.evaluation import BertScoreLoadError, bertscore

WORDS = "the cat sat on a mat dog ran fast hello world model score red blue green tree house".split()
LAYER = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny_bert")
    core = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    core.normalizer = normalizers.BertNormalizer(lowercase=True)
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False
    )
    core.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    tokenizer = BertTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        BertModel(config).save_pretrained(path)
    return str(path)


def naive_bertscore(path: str, pairs: list[tuple[str, str]]) -> list[tuple[float, float, float]]:
    """Greedy cosine matching of layer-LAYER token embeddings (Zhang et al. 2020, no idf), as bert_score does it:
    every token but [CLS]/[SEP] is scored (weight 1), and it is matched against all tokens of the other side."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path).eval()

    def embed(text: str) -> torch.Tensor:
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**enc, output_hidden_states=True).hidden_states[LAYER][0]
        return hidden / hidden.norm(dim=-1, keepdim=True)

    scores = []
    for candidate, reference in pairs:
        cand, ref = embed(candidate), embed(reference)
        sim = cand @ ref.T  # [cand tokens, ref tokens], [CLS] first and [SEP] last on both sides
        precision = sim[1:-1].max(dim=1).values.mean().item()
        recall = sim[:, 1:-1].max(dim=0).values.mean().item()
        scores.append((precision, recall, 2 * precision * recall / (precision + recall)))
    return scores


def test_bertscore_matches_naive_greedy_matching(tiny_bert):
    predictions = ["the cat sat on a mat", "hello world", "red tree house"]
    references = ["a dog ran fast", "hello model", "green tree"]
    result = bertscore(predictions, references, model_type=tiny_bert, num_layers=LAYER, batch_size=2)
    naive = naive_bertscore(tiny_bert, list(zip(predictions, references)))
    for i, (_, _, f) in enumerate(naive):
        assert result["f1_per_row"][i] == pytest.approx(f, abs=1e-5)
    for key, column in (("precision", 0), ("recall", 1), ("f1", 2)):
        expected = 100 * sum(row[column] for row in naive) / len(naive)
        assert result[key] == pytest.approx(expected, abs=2e-4)
    assert result["model_type"] == tiny_bert and result["num_layers"] == LAYER
    assert result["idf"] is False and result["rescale_with_baseline"] is False
    assert result["bert_score_version"] and "L2_no-idf" in result["hash"]


def test_bertscore_identical_text_is_perfect_and_takes_the_best_reference(tiny_bert):
    same = bertscore(["blue house"], ["blue house"], model_type=tiny_bert, num_layers=LAYER)
    assert same["f1"] == pytest.approx(100.0, abs=1e-3)
    several = bertscore(
        ["the cat sat"], [["dog ran fast", "the cat sat"]], model_type=tiny_bert, num_layers=LAYER, batch_size=4
    )
    single = bertscore(["the cat sat"], ["dog ran fast"], model_type=tiny_bert, num_layers=LAYER)
    assert several["f1"] == pytest.approx(100.0, abs=1e-3)
    assert single["f1"] < several["f1"]


def test_bertscore_missing_model_names_the_settings(tmp_path):
    with pytest.raises(BertScoreLoadError, match=r"bertscore\.model_type=PATH.*bertscore\.enabled=false"):
        bertscore(["a"], ["a"], model_type=str(tmp_path / "absent"), num_layers=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BertScoreLoadError, match="could not be loaded.*bertscore.num_layers"):
        bertscore(["a"], ["a"], model_type=str(empty), num_layers=2)
