"""arkd: knowledge distillation of causal language models with adaptive forward/reverse KL.

Importing ``arkd`` stays light: submodules (``arkd.losses``, ``arkd.policy``, ``arkd.data``, ...) are imported
explicitly, so ``import arkd.losses`` needs nothing but torch.
"""

__version__ = "0.1.0"
