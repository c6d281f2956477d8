"""The ARKD policy network: a small MLP giving a Beta distribution over alpha in (0, 1)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Beta


class PolicyNetwork(nn.Module):
    """MLP from normalised features to a unimodal ``Beta(a, b)`` over alpha, ``a = 1 + softplus(h_0)``,
    ``b = 1 + softplus(h_1)``.

    Keeping ``a, b > 1`` makes every policy unimodal with a density that vanishes at 0 and 1 (Chou et al. 2017, Beta
    policies for bounded actions): log-probabilities and their gradients stay bounded, where ``a < 1`` or ``b < 1``
    would pile mass on the edges and let a few samples dominate the update. The mean ``a / (a + b)`` can still reach
    any value in (0, 1). The last layer starts near zero, so before any learning every input gets mean
    ``init_alpha`` and concentration ``a + b = init_concentration``.

    Args:
        in_features: length of a feature vector.
        hidden_size: width of the hidden layers.
        num_layers: number of hidden layers (>= 1).
        init_alpha: initial mean of alpha, in (0, 1).
        init_concentration: initial ``a + b``; both ``init_alpha * init_concentration`` and
            ``(1 - init_alpha) * init_concentration`` must exceed 1 (Beta(2, 2) at the defaults).
        zero_inputs: positions of inputs that enter the first layer through weights of their own, initialised to 0
            (``zero_weight`` ``[k, hidden_size]``, added to the first layer's output) instead of columns of its
            matrix: the other weights are drawn as for a network without them, and while those inputs are 0 the
            network computes exactly what that network computes (the ``on_policy`` feature, docs/policy.md).
    """

    def __init__(
        self,
        in_features: int,
        *,
        hidden_size: int = 64,
        num_layers: int = 2,
        init_alpha: float = 0.5,
        init_concentration: float = 4.0,
        zero_inputs: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"PolicyNetwork: num_layers must be >= 1, got {num_layers}")
        if not 0 < init_alpha < 1:
            raise ValueError(f"PolicyNetwork: init_alpha must be in (0, 1), got {init_alpha}")
        a0, b0 = init_alpha * init_concentration, (1 - init_alpha) * init_concentration
        if a0 <= 1 or b0 <= 1:
            raise ValueError(
                f"PolicyNetwork: init_concentration={init_concentration} is too small for init_alpha={init_alpha}; "
                f"need init_alpha * init_concentration > 1 and (1 - init_alpha) * init_concentration > 1"
            )
        zero_inputs = tuple(sorted(int(i) for i in zero_inputs))
        if any(not 0 <= i < in_features for i in zero_inputs) or len(set(zero_inputs)) != len(zero_inputs):
            raise ValueError(f"PolicyNetwork: zero_inputs {zero_inputs} must be distinct inputs of {in_features}")
        self.in_features = in_features
        self.zero_inputs = zero_inputs
        self.kept_inputs = tuple(i for i in range(in_features) if i not in zero_inputs)
        layers: list[nn.Module] = []
        width = in_features - len(zero_inputs)
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.Tanh()]
            width = hidden_size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2)
        with torch.no_grad():
            self.head.weight.mul_(0.01)
            self.head.bias.copy_(torch.tensor([_softplus_inverse(a0 - 1), _softplus_inverse(b0 - 1)]))
        self.zero_weight = nn.Parameter(torch.zeros(len(zero_inputs), hidden_size)) if zero_inputs else None

    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero_weight is None:
            return self.body(x)
        h = self.body[0](x[..., list(self.kept_inputs)])
        h = h + x[..., list(self.zero_inputs)] @ self.zero_weight
        return self.body[1:](h)

    def concentrations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Beta parameters ``(a [...], b [...])`` (both > 1) for inputs ``x`` ``[..., in_features]``."""
        h = self.head(self._hidden(x))
        softplus = nn.functional.softplus(h)
        return 1.0 + softplus[..., 0], 1.0 + softplus[..., 1]

    def mean_concentration(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``a / (a + b)`` and concentration ``a + b`` of alpha's distribution, each ``[...]``."""
        a, b = self.concentrations(x)
        return a / (a + b), a + b

    def forward(self, x: torch.Tensor) -> Beta:
        """The distribution of alpha for every row of ``x`` ``[..., in_features]`` (batch shape ``[...]``)."""
        a, b = self.concentrations(x)
        return Beta(a, b, validate_args=False)  # a, b > 1 by construction; also allows 0 rows


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))
