"""arkd inside the trainers people already use (docs/integrations.md).

- :mod:`arkd.integrations.transformers`: ``KDTrainer``, a ``transformers.Trainer`` that distils from a teacher with
  any arkd loss and alpha strategy (the learned policy with its paired reward and the alpha-signal probe included).
- :mod:`arkd.integrations.trl`: ``ARKDGKDTrainer``, TRL's ``GKDTrainer`` (``trl.experimental.gkd``, TRL >= 1.16) with
  ``loss=`` and ``alpha=`` (``pip install "arkd[trl]"``).

Both are imported on demand: ``import arkd.integrations`` imports neither transformers' Trainer nor TRL.
"""

__all__: list[str] = []
