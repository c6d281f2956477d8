"""Cost of arkd's per-row sampler against plain batched multinomial sampling, per generation step.

    python scripts/bench_sampling.py                      # [16, 50257] and [32, 151936], CPU, 1 thread
    python scripts/bench_sampling.py --device cuda --threads 0

arkd draws each row's token from its own ``(seed, row)`` stream (``arkd.evaluation.generation._RowSampler``: one CPU
draw per row, then inverse-CDF sampling in float64 over the whole batch, then scores with all the mass on the drawn
token). ``transformers``' own sampling is one ``torch.multinomial`` over ``softmax(scores)`` from the global stream.
Prints the median time of one step of each and their ratio, measured in this run; then one end-to-end comparison:
``arkd.evaluation.generate`` against ``model.generate(do_sample=True)`` (transformers' own sampler) on a random
2-layer GPT-2 of vocabulary 50257 (16 prompts of 32 tokens, 32 new tokens, ``no_repeat_ngram_size`` 6, EOS never
drawn so every row runs the full length).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from arkd.evaluation.generation import _RowSampler, row_generator


def _median_ms(fn, repeats: int, sync) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _multinomial(scores: torch.Tensor) -> torch.Tensor:
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0: leave torch's default)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device {device}, torch threads {torch.get_num_threads()}, median of {args.repeats} steps")
    print("| batch x vocabulary | multinomial (ms) | arkd per-row sampler (ms) | ratio |")
    print("|---|---:|---:|---:|")
    for batch, vocab in ((16, 50257), (32, 151936)):
        scores = torch.randn(batch, vocab, device=device) * 3
        sampler = _RowSampler([row_generator(10, row) for row in range(batch)])
        plain = _median_ms(partial(_multinomial, scores), args.repeats, sync)
        ours = _median_ms(partial(sampler, None, scores), args.repeats, sync)
        print(f"| {batch} x {vocab} | {plain:.2f} | {ours:.2f} | {ours / plain:.2f} |")
    _end_to_end(device, sync)


def _end_to_end(device: torch.device, sync) -> None:
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    from arkd.evaluation import DecodingConfig, generate

    torch.manual_seed(0)
    vocab, rows, width, new = 50257, 16, 32, 32
    config = GPT2Config(vocab_size=vocab, n_layer=2, n_head=2, n_embd=128, n_positions=128)
    model = GPT2LMHeadModel(config).to(device).eval()
    with torch.no_grad():  # never end early: the same number of steps for both
        model.lm_head.weight[vocab - 1] = -100.0

    class Tokenizer:  # fixed prompt ids, decoded as their numbers
        eos_token_id = pad_token_id = vocab - 1
        eos_token = None

        def __call__(self, prompts, add_special_tokens=True):
            return {"input_ids": [[(7 * i + j) % (vocab - 1) for j in range(width)] for i in range(len(prompts))]}

        def decode(self, ids, **kwargs):
            return " ".join(map(str, ids))

    prompts = [str(i) for i in range(rows)]
    decoding = DecodingConfig(max_new_tokens=new)
    ids = torch.tensor(Tokenizer()(prompts)["input_ids"], device=device)
    native = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, no_repeat_ngram_size=6,
                              max_new_tokens=new, eos_token_id=vocab - 1, pad_token_id=vocab - 1)  # fmt: skip

    def ours():
        generate(model, Tokenizer(), prompts, seed=10, batch_size=rows, decoding=decoding, progress=False)

    def theirs():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=native)

    a, b = _median_ms(theirs, 5, sync), _median_ms(ours, 5, sync)
    print(f"\nend to end ({rows} x {width} prompt tokens, {new} new, vocabulary {vocab}, 2-layer GPT-2, median of 5):")
    print(f"transformers' sampler {a:.0f} ms, arkd's per-row sampler {b:.0f} ms, ratio {b / a:.2f}")


if __name__ == "__main__":
    main()
