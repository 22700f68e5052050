"""Small models covering every layer type rankcut handles, and planted test data (``toy_models:cnn_factory``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rankcut.tasks.fashion_mnist import DEFAULT_DATA_DIR, FILES


class Conv1D(nn.Module):
    """Same layout as Hugging Face GPT-2's Conv1D: weight stored (in, out), y = x W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class ToyCNN(nn.Module):
    """A small CNN with a plain, a strided bias-free, a grouped and a depthwise conv, and a classifier head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.grouped = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.norm = nn.BatchNorm2d(2 * width)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.down(x))
        x = torch.relu(self.grouped(x))
        x = self.norm(self.depthwise(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4)
        return self.head(x)


class ToyTransformerBlock(nn.Module):
    """Linear layers, an HF-style Conv1D, an nn.MultiheadAttention and a tied output layer."""

    def __init__(self, dim: int = 32, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.c_fc = Conv1D(4 * dim, dim)
        self.c_proj = Conv1D(dim, 4 * dim)
        self.mix = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.c_proj(torch.relu(self.c_fc(x)))
        return self.lm_head(self.mix(x))


def cnn_factory() -> nn.Module:
    """A seeded ToyCNN (for ``module:factory`` on the command line)."""
    torch.manual_seed(0)
    return ToyCNN().eval()


def cnn_inputs() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


class ToyTask:
    """A tiny seeded classification task for ToyCNN, following rankcut's Task contract."""

    name = "toy"
    metric_name = "accuracy"

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(3)
        self.images = torch.randn(64, 3, 16, 16, generator=g)
        self.labels = cnn_factory()(self.images).argmax(1).detach()  # the original model is right by construction

    def build_model(self) -> nn.Module:
        return cnn_factory()

    def example_inputs(self) -> torch.Tensor:
        return self.images[:2]

    def calibration_batches(self, num_samples: int, batch_size: int):
        for start in range(0, num_samples, batch_size):
            yield self.images[start:start + batch_size], self.labels[start:start + batch_size]

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        return nn.functional.cross_entropy(model(images), labels)

    def evaluate(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        with torch.no_grad():
            logits = model(self.images)
        return {"accuracy": float((logits.argmax(1) == self.labels).float().mean()),
                "loss": float(nn.functional.cross_entropy(logits, self.labels))}


def toy_task() -> ToyTask:
    return ToyTask()


def planted(m: int, n: int, rank: int, noise: float, seed: int = 0, strength: float = 3.0) -> torch.Tensor:
    """Low-rank signal with singular values ``strength``-6x the noise edge, plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    edge = noise * (math.sqrt(m) + math.sqrt(n))
    values = edge * torch.linspace(strength, 2 * strength, rank, dtype=torch.float64)
    return U @ torch.diag(values) @ V.T + noise * torch.randn(m, n, generator=g, dtype=torch.float64)


needs_fashion_mnist = pytest.mark.skipif(
    not all((DEFAULT_DATA_DIR / name).is_file() for pair in FILES.values() for name in pair),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)

