"""ARKDGKDTrainer: a TRL GKD script switched to arkd with one import and two keyword arguments (docs/integrations.md).

Needs pip install -e ".[trl]". Run: python examples/gkd_trainer.py (tiny random models, CPU, offline).
"""

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel
from trl.experimental.gkd import GKDConfig

from arkd.integrations.trl import ARKDGKDTrainer  # was: from trl.experimental.gkd import GKDTrainer
from arkd.losses import BidirectionalKLLoss
from arkd.models import build_tiny_tokenizer
from arkd.policy import LearnedPolicy

tokenizer = build_tiny_tokenizer(vocab_size=300, corpus_size=200)  # offline; yours: AutoTokenizer.from_pretrained
tokenizer.chat_template = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
shape = dict(vocab_size=len(tokenizer), n_positions=128, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
teacher = GPT2LMHeadModel(GPT2Config(n_embd=64, **shape))
student = GPT2LMHeadModel(GPT2Config(n_embd=32, **shape))
questions = [f"what is {a} plus {b}?" for a in range(4) for b in range(4)]
train = Dataset.from_list(
    [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "it is 3"}]} for q in questions]
)

args = GKDConfig(
    "runs/gkd_example",
    lmbda=0.5,
    max_new_tokens=8,
    max_length=64,
    max_steps=8,
    per_device_train_batch_size=4,
    learning_rate=1e-3,
    logging_steps=2,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    bf16=False,
)
trainer = ARKDGKDTrainer(
    model=student,
    teacher_model=teacher,
    args=args,
    train_dataset=train,
    processing_class=tokenizer,  # GKD's own ChatML collator, on-policy sampling (lmbda) as before
    loss=BidirectionalKLLoss(),
    alpha=LearnedPolicy(seed=0),
)  # the two arkd arguments
trainer.train()
print(trainer.state.log_history[-2])
