"""The teacher cache measured: the error of the top-k losses against the full-vocabulary ones, and the memory and time
a training step saves when the teacher is read from a cache instead of run.

    python scripts/bench_topk.py error            # a GPT-2-shape random teacher and the tiny job's trained teacher
    python scripts/bench_topk.py step             # peak memory / step time: live gpt2-medium-shape teacher vs cache

``error``: per k, the relative error ``(full - top-k) / full`` of the mean FKL, RKL, bidirectional KL (alpha 0.5)
and generalized JSD (beta 0.5) over the counted tokens, the relative error and cosine of their gradients with
respect to the student's logits, and the teacher's mean top-k mass. Two pairs: (1) "random": random-init GPT-2
models at vocabulary 50257 (teacher 2 x 768, student 1 x 768) on random rows of 128 tokens (96 counted); (2)
"tiny": the tiny job's SFT'd teacher and SFT'd student (``config=tiny``, from the SFT cache, trained there if
missing) on 64 training rows.

``step``: each in a fresh process (CPU, fp32, one thread): a live gpt2-medium-shape teacher (24 x 1024, 355M
parameters, random init) and the same teacher's top-k cache, a 2 x 768 GPT-2 student, vocabulary 50257, batches of
4 rows of 128 tokens; the median time of steps 2-4 and the peak resident memory of the process, plus the cache's
write time and size.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

KS_RANDOM = [1, 8, 64, 256, 1024, 50257]
KS_TINY = [1, 4, 16, 64, 512]


def _losses():
    import arkd.losses as L

    full = {
        "fkl": lambda s, t, m: L.forward_kl(s, t, m),
        "rkl": lambda s, t, m: L.reverse_kl(s, t, m),
        "bikl": lambda s, t, m: L.bidirectional_kl(s, t, m, alpha=0.5),
        "gjsd": lambda s, t, m: L.generalized_jsd(s, t, m, beta=0.5),
    }
    top = {
        "fkl": lambda s, t, m: L.forward_kl_topk(s, t, m),
        "rkl": lambda s, t, m: L.reverse_kl_topk(s, t, m),
        "bikl": lambda s, t, m: L.bidirectional_kl_topk(s, t, m, alpha=0.5),
        "gjsd": lambda s, t, m: L.generalized_jsd_topk(s, t, m, beta=0.5),
    }
    return full, top


def _errors(name: str, s_logits, t_logits, mask, ks) -> list[dict]:
    import torch

    from arkd.losses import TopKTeacher

    full, top = _losses()
    rows = []
    reference = {}
    for loss, fn in full.items():
        s = s_logits.detach().clone().requires_grad_(True)
        value = fn(s, t_logits, mask)
        (grad,) = torch.autograd.grad(value, s)
        reference[loss] = (float(value.detach()), grad[mask])
    p = torch.softmax(t_logits[mask].float(), -1)
    for k in ks:
        teacher = TopKTeacher.from_logits(t_logits, k)
        mass = float(p.topk(k, -1).values.sum(-1).mean())
        row = {"pair": name, "k": k, "top_k_mass": round(mass, 4)}
        for loss, fn in top.items():
            s = s_logits.detach().clone().requires_grad_(True)
            value = fn(s, teacher, mask)
            (grad,) = torch.autograd.grad(value, s)
            v_full, g_full = reference[loss]
            g = grad[mask]
            row[f"{loss}_rel_err"] = round((v_full - float(value.detach())) / v_full, 4)
            row[f"{loss}_grad_rel_err"] = round(float((g - g_full).norm() / g_full.norm()), 4)
            row[f"{loss}_grad_cos"] = round(
                float(torch.nn.functional.cosine_similarity(g.double().flatten(), g_full.double().flatten(), 0)), 4
            )
        rows.append(row)
    return rows


def _random_pair():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=768, n_head=12, n_positions=128)).eval()
    student = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=768, n_head=12, n_positions=128)).eval()
    ids = torch.randint(0, 50257, (4, 128), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 127, dtype=torch.bool)
    mask[:, 31:] = True
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1]
        s = student(input_ids=ids).logits[:, :-1]
    return s, t, mask


def _tiny_pair():
    import torch
    from hydra.utils import instantiate

    from arkd.cli.cache_teacher import prepare_rows
    from arkd.cli.train import _compose
    from arkd.data import TrainingCollator
    from arkd.models import slice_to_vocab
    from arkd.recipes.build import make_accelerator, quiet_libraries
    from arkd.recipes.sft_cache import sft_cached

    quiet_libraries()
    cfg = _compose(["config=tiny"])
    tokenizer = instantiate(cfg.tokenizer)
    rows, train, _ = prepare_rows(cfg, tokenizer)
    collate = TrainingCollator(tokenizer.pad_token_id)
    accelerator = make_accelerator(cfg)
    models = {}
    for role, node in (("teacher", cfg.teacher), ("student", cfg.model)):
        model, _ = sft_cached(role, node, cfg.init_sft[role], cfg=cfg, tokenizer=tokenizer, train_dataset=train,
                              collate=collate, accelerator=accelerator)  # fmt: skip
        models[role] = slice_to_vocab(model, len(tokenizer)).eval()
    batch = collate(rows[:64])
    with torch.no_grad():
        t = models["teacher"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        s = models["student"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return s, t, batch["loss_mask"][:, 1:].bool()


def error() -> list[dict]:
    import torch

    torch.set_num_threads(2)
    out = _errors("random (V=50257)", *_random_pair(), KS_RANDOM)
    s, t, m = _tiny_pair()
    return out + _errors(f"tiny trained (V={t.shape[-1]})", s, t, m, [k for k in KS_TINY if k <= t.shape[-1]])


# ------------------------------------------------------------------------------------------------------------- step


def _rows(n: int, length: int, prompt: int):
    import torch

    g = torch.Generator().manual_seed(2)
    return [
        {"prompt_ids": torch.randint(0, 50257, (prompt,), generator=g).tolist(),
         "response_ids": torch.randint(0, 50257, (length - prompt,), generator=g).tolist()}
        for _ in range(n)
    ]  # fmt: skip


def _teacher():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=128)).eval()


def _child_write(root: str, k: int) -> dict:
    import torch

    from arkd.data import TrainingCollator
    from arkd.teacher_cache import write_cache

    torch.set_num_threads(1)
    teacher = _teacher()
    started = time.perf_counter()
    manifest = write_cache(root, teacher=teacher, rows=_rows(32, 128, 32), identity=_identity(k),
                           collate=TrainingCollator(50256), batch_size=4, progress=False)  # fmt: skip
    seconds = time.perf_counter() - started
    return {"write_seconds": round(seconds, 1), "tokens": manifest["tokens_total"], "bytes": manifest["bytes_total"]}


def _identity(k: int) -> dict:
    return {"format": 1, "teacher": "gpt2-medium-shape-random", "top_k": k, "temperature": 1.0, "vocab_size": 50257}


def _child_step(mode: str, root: str, k: int) -> dict:
    import torch
    from accelerate import Accelerator
    from transformers import GPT2Config, GPT2LMHeadModel

    from arkd.data import TrainingCollator
    from arkd.losses import BidirectionalKLLoss
    from arkd.policy import ConstantAlpha
    from arkd.teacher_cache import TeacherCache
    from arkd.trainer import Trainer, TrainerConfig

    torch.set_num_threads(1)
    teacher = _teacher() if mode == "live" else TeacherCache(root, _identity(k))
    torch.manual_seed(1)
    student = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=768, n_head=12, n_positions=128))
    collate = TrainingCollator(50256)
    rows = _rows(32, 128, 32)
    batches = iter([collate(rows[i : i + 4]) for i in range(0, 32, 4)])

    class Stream:
        def __next__(self):
            return next(batches)

        def state_dict(self):
            return {}

    trainer = Trainer(
        student=student, teacher=teacher, tokenizer=None, batches=Stream(), strategy=ConstantAlpha(alpha=0.5),
        loss=BidirectionalKLLoss(reduction="sum"), optimizer=torch.optim.AdamW(student.parameters(), lr=1e-4),
        scheduler=None, accelerator=Accelerator(cpu=True), reward=None,
        config=TrainerConfig(max_steps=8, output_dir=tempfile.mkdtemp(), progress=False, log_interval=100),
    )  # fmt: skip
    times = []
    for _ in range(4):
        started = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "step_seconds": round(statistics.median(times[1:]), 2), "peak_rss_mib": round(peak)}


def _spawn(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "_child", *args], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step(k: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        written = _spawn("write", root, str(k))
        live = _spawn("live", root, str(k))
        cached = _spawn("cached", root, str(k))
    return {"k": k, **written, "bytes_per_token": round(written["bytes"] / written["tokens"], 1), "live": live,
            "cached": cached, "time_ratio": round(live["step_seconds"] / cached["step_seconds"], 2),
            "memory_ratio": round(live["peak_rss_mib"] / cached["peak_rss_mib"], 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["error", "step", "_child"])
    parser.add_argument("rest", nargs="*")
    parser.add_argument("--k", type=int, default=64)
    args = parser.parse_args()
    if args.what == "_child":
        mode, root, k = args.rest
        result = _child_write(root, int(k)) if mode == "write" else _child_step(mode, root, int(k))
        print(json.dumps(result))
        return
    if args.what == "error":
        rows = error()
        keys = list(rows[0])
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for row in rows:
            print("| " + " | ".join(str(row[key]) for key in keys) + " |")
        return
    print(json.dumps(step(args.k), indent=1))


if __name__ == "__main__":
    main()
