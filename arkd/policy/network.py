"""The ARKD policy network: a small MLP giving a Beta distribution over alpha in (0, 1)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributions import Beta


class PolicyNetwork(nn.Module):
    """MLP from normalised features to ``Beta(m * kappa, (1 - m) * kappa)`` over alpha.

    The head predicts the mean ``m = sigmoid(h_0)`` and the concentration ``kappa = min_concentration +
    softplus(h_1)``: the mean is what the deterministic policy plays, the concentration how much it explores. The
    last layer starts near zero, so before any learning every input gets mean ``init_alpha`` and concentration
    ``init_concentration``.

    Args:
        in_features: length of a feature vector.
        hidden_size: width of the hidden layers.
        num_layers: number of hidden layers (>= 1).
        init_alpha: initial mean of alpha, in (0, 1).
        init_concentration: initial kappa (> min_concentration); Beta(2, 2) at 4 with mean 0.5.
        min_concentration: lower bound of kappa (> 0).
    """

    def __init__(
        self,
        in_features: int,
        *,
        hidden_size: int = 64,
        num_layers: int = 2,
        init_alpha: float = 0.5,
        init_concentration: float = 4.0,
        min_concentration: float = 0.5,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"PolicyNetwork: num_layers must be >= 1, got {num_layers}")
        if not 0 < init_alpha < 1:
            raise ValueError(f"PolicyNetwork: init_alpha must be in (0, 1), got {init_alpha}")
        if not 0 < min_concentration < init_concentration:
            raise ValueError(
                f"PolicyNetwork: need 0 < min_concentration < init_concentration, got {min_concentration} and "
                f"{init_concentration}"
            )
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.Tanh()]
            width = hidden_size
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2)
        self.min_concentration = float(min_concentration)
        with torch.no_grad():
            self.head.weight.mul_(0.01)
            kappa_excess = init_concentration - min_concentration
            softplus_inverse = kappa_excess + math.log(-math.expm1(-kappa_excess))
            self.head.bias.copy_(torch.tensor([math.log(init_alpha / (1 - init_alpha)), softplus_inverse]))

    def mean_concentration(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and concentration of alpha's Beta distribution.

        Args:
            x: ``[..., in_features]``.

        Returns:
            ``(mean [...], kappa [...])``.
        """
        h = self.head(self.body(x))
        mean = torch.sigmoid(h[..., 0])
        kappa = self.min_concentration + nn.functional.softplus(h[..., 1])
        return mean, kappa

    def forward(self, x: torch.Tensor) -> Beta:
        """The distribution of alpha for every row of ``x`` ``[..., in_features]`` (batch shape ``[...]``)."""
        mean, kappa = self.mean_concentration(x)
        eps = 1e-6
        mean = mean.clamp(eps, 1 - eps)
        return Beta(mean * kappa, (1 - mean) * kappa)
