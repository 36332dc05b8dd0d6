"""A Fréchet distance for 16x16 digits, in the feature space of a small classifier trained on the same data.

The Inception network of the usual FID knows nothing of 16x16 grey digits, so the benchmarks use a stand-in built the
same way: a small CNN is trained (seeded) to classify the digits' train split; the spatial means and stds of its
two conv layers' channels and its penultimate layer (128 features) embed images, each feature divided by its std over the reference set; the score is the Fréchet distance between
Gaussians fitted to the features of generated samples and of the held-out test split (297 images). Checked by hand:
the whole train split (1500 images) scores 2.9, the train split with Gaussian noise of std 0.1 / 0.3 added 8.2 / 60, blurred by a 3x3
box 220, pure noise 1860. Lower is better; the train split itself scores the floor of what a perfect
sampler would get against that small reference set (reported as the `data` row).

Scores are comparable only within one run of the same classifier (same seed).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitsClassifier(nn.Module):
    """Two conv blocks and two linear layers."""

    def __init__(self, num_features: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, num_features)
        self.fc2 = nn.Linear(num_features, 10)

    def _forward(self, x: torch.Tensor):
        h1 = F.relu(self.conv1(x))
        h2 = F.relu(self.conv2(F.max_pool2d(h1, 2)))
        penultimate = torch.tanh(self.fc1(F.max_pool2d(h2, 2).flatten(1)))
        return h1, h2, penultimate

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """128 features: the spatial mean and std of each channel of both conv layers (sensitive to noise and blur,
        as Inception's pool features are) and the 32-d penultimate layer (sensitive to which digit it is)."""
        h1, h2, penultimate = self._forward(x)
        stats = [h.mean((2, 3)) for h in (h1, h2)] + [h.std((2, 3)) for h in (h1, h2)]
        return torch.cat(stats + [penultimate], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self._forward(x)[2])


def train_classifier(images: torch.Tensor, labels: torch.Tensor, seed: int = 0, epochs: int = 30,
                     batch_size: int = 64) -> DigitsClassifier:
    """Trains the classifier with Adam and a little random shift augmentation (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for begin in range(0, len(images), batch_size):
            index = order[begin:begin + batch_size]
            x = images[index]
            shift = torch.randint(-1, 2, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model(images).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def features(model: DigitsClassifier, images: torch.Tensor) -> np.ndarray:
    """The features (float64 numpy) of `images`, clamped to `[-1, 1]`."""
    feats = torch.cat([model.features(images[i:i + 512].clamp(-1, 1)) for i in range(0, len(images), 512)])
    return feats.double().numpy()


def statistics(feats: np.ndarray):
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """`||mu1 - mu2||^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))`, the trace term from a symmetric eigenproblem."""
    w, v = np.linalg.eigh(cov1)
    sqrt1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1)
    trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


class DigitsFID:
    """Trains the classifier once, then scores sets of samples against the held-out split."""

    def __init__(self, size: int = 16, seed: int = 0, epochs: int = 30, num_samples: int = 1500):
        from analytic_schedulers.datasets import digits_images, digits_labels

        train_x, train_y = digits_images("train", size), digits_labels("train")
        self.test_images = digits_images("test", size)
        self.model = train_classifier(train_x, train_y, seed=seed, epochs=epochs)
        self.test_accuracy = accuracy(self.model, self.test_images, digits_labels("test"))
        reference = features(self.model, self.test_images)
        # each feature in units of its spread over the reference set, so that the many small, noise-sensitive
        # features weigh as much as the few large, class-sensitive ones
        self.scale = reference.std(0) + 1e-6
        self.reference = statistics(reference / self.scale)
        # the floor: real train images, as many as each sampler is scored with (FID is biased by sample size)
        self.data_fid = self(train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
                                     [:num_samples]])

    def __call__(self, samples: torch.Tensor) -> float:
        feats = features(self.model, samples.float().cpu()) / self.scale
        return frechet_distance(*statistics(feats), *self.reference)
