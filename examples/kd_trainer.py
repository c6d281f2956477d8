"""KDTrainer: a transformers.Trainer that distils with arkd's loss and the learned alpha policy (docs/integrations.md).

Run from the repository root: python examples/kd_trainer.py (tiny random models, CPU, offline).
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

from arkd.integrations.transformers import KDTrainer
from arkd.losses import BidirectionalKLLoss
from arkd.policy import AlphaSignalProbe, LearnedPolicy
from arkd.reward import PairedReward

torch.manual_seed(0)  # two tiny random GPT-2 models stand in for yours (AutoModelForCausalLM.from_pretrained)
shape = dict(vocab_size=64, n_positions=32, n_layer=1, n_head=2)
teacher = GPT2LMHeadModel(GPT2Config(n_embd=64, **shape))
student = GPT2LMHeadModel(GPT2Config(n_embd=32, **shape))
ids = torch.randint(0, 64, (32, 16))
labels = ids.masked_fill(torch.arange(16) < 4, -100)  # a 4-token prompt: -100 = not counted, as HF's losses
train = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": y} for x, y in zip(ids, labels)]

args = TrainingArguments(
    "runs/kd_example",
    max_steps=8,
    per_device_train_batch_size=4,
    learning_rate=1e-3,
    logging_steps=2,
    save_steps=4,
    report_to=[],
    use_cpu=True,
)
trainer = KDTrainer(
    model=student,
    teacher_model=teacher,
    args=args,
    train_dataset=train,
    loss=BidirectionalKLLoss(),
    alpha=LearnedPolicy(seed=0),
    reward=PairedReward(interval=2),
    probe=AlphaSignalProbe(interval=4),
)
trainer.train()
print(trainer.state.log_history[-2])  # loss, alpha, reward, fkl, rkl, alpha_signal_slope, policy_* ...
