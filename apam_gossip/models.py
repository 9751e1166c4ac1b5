"""The models of the APAM paper's experiments (LeNet5, AllCNN) and a small MLP.

All models are buffer-free (no BatchNorm), so a model is exactly its flat parameter
vector (see :mod:`apam_gossip.flat`). ``build_model`` is deterministic given
``torch.manual_seed``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MODELS  # the names live with the schema
from .errors import UserError


class MLP(nn.Module):
    """Flatten, then fully connected layers with ReLU."""

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int,
                 hidden: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        dims = [in_shape[0] * in_shape[1] * in_shape[2], *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling.

    28x28 inputs are zero-padded by 2 so the first convolution sees 32x32, as in the
    original; 32x32 inputs (CIFAR-10) are used as they are.
    """

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        if h < 28 or w < 28:
            raise UserError(
                f"model lenet5 needs images of at least 28x28, got {h}x{w}; "
                "use --model mlp for small images such as the digits dataset"
            )
        pad = 2 if h < 32 else 0
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        with torch.no_grad():
            n_flat = self.features(torch.zeros(1, c, h, w)).numel()
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(n_flat, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, n_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class AllCNN(nn.Module):
    """All-CNN-C (Springenberg et al. 2015): only convolutions, global average pooling.

    Dropout is left out so that a run is a deterministic function of its seed and
    batches (the asynchronous-vs-sequential equivalence tests rely on that).
    """

    def __init__(self, in_shape: tuple[int, int, int], n_classes: int) -> None:
        super().__init__()
        c, h, w = in_shape
        if h < 8 or w < 8:
            raise UserError(f"model allcnn needs images of at least 8x8, got {h}x{w}")

        def conv(a: int, b: int, k: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(a, b, k, stride=stride, padding=k // 2), nn.ReLU()]

        self.net = nn.Sequential(
            *conv(c, 96, 3), *conv(96, 96, 3), *conv(96, 96, 3, stride=2),
            *conv(96, 192, 3), *conv(192, 192, 3), *conv(192, 192, 3, stride=2),
            *conv(192, 192, 3), *conv(192, 192, 1),
            nn.Conv2d(192, n_classes, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_model(name: str, in_shape: tuple[int, int, int], n_classes: int) -> nn.Module:
    """Construct model ``name`` (one of :data:`MODELS`) for the given input shape."""
    if name == "mlp":
        return MLP(in_shape, n_classes)
    if name == "lenet5":
        return LeNet5(in_shape, n_classes)
    if name == "allcnn":
        return AllCNN(in_shape, n_classes)
    raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
