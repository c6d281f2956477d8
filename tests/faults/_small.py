"""The small tiny job the fault tests run (their shared overrides)."""

SMALL = [
    "config=tiny",
    "init_sft.teacher=null",
    "init_sft.student=null",
    "data.splits.n_train=64",
    "data.splits.n_validation=4",
    "data.splits.n_test=4",
    "data.batch_size=8",
    "trainer.max_steps=6",
    "reward=paired",  # the one-step reward: 64 training rows cannot spare the horizon reward's 64 held-out ones
    "trainer.log_interval=1",
    "trainer.eval_interval=3",
    "trainer.save_interval=2",
    "trainer.keep_last=2",
    "trainer.progress=false",
    "validation.max_new_tokens=2",
    "report.enabled=false",
]
