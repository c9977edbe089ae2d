"""Clean images (MNIST digits, or generated piecewise-constant shapes) and their blurred, noisy observations."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .operators import convolve, gaussian_kernel, transfer

__all__ = ["DATASETS", "Images", "degrade", "load_images", "mnist_images", "shapes"]

DATASETS = ("mnist", "shapes")


class Images(NamedTuple):
    """Training and held-out pairs: clean images and observations ``(B, H, W)``."""

    train_clean: Tensor
    train_observed: Tensor
    test_clean: Tensor
    test_observed: Tensor


def shapes(n: int, size: int, generator: torch.Generator) -> Tensor:
    """``n`` piecewise-constant ``size x size`` images in [0, 1]: a background level and 3 to 5 overlapping
    axis-aligned rectangles or discs, each of a random constant intensity."""
    rows = torch.arange(size, dtype=torch.float64)[:, None]
    cols = torch.arange(size, dtype=torch.float64)[None, :]
    images = []
    for _ in range(n):
        img = torch.full((size, size), float(torch.rand(1, generator=generator)) * 0.3, dtype=torch.float64)
        for _ in range(int(torch.randint(3, 6, (1,), generator=generator))):
            c = torch.rand(2, generator=generator) * size
            r = (0.1 + 0.25 * torch.rand(2, generator=generator)) * size
            if bool(torch.rand(1, generator=generator) < 0.5):
                inside = ((rows - c[0]).abs() <= r[0]) & ((cols - c[1]).abs() <= r[1])
            else:
                inside = (rows - c[0]) ** 2 + (cols - c[1]) ** 2 <= r[0] ** 2
            img[inside] = float(torch.rand(1, generator=generator))
        images.append(img)
    return torch.stack(images).float()


def mnist_images(n: int, size: int, generator: torch.Generator, data_dir: str | None, *, train: bool) -> Tensor:
    """``n`` random MNIST digits (training or test split) in [0, 1], resized bilinearly to ``size x size``."""
    from bilevel.problems.hyperparameter.mnist import load_mnist

    mnist = load_mnist(data_dir)
    pool = mnist.train_images if train else mnist.test_images
    picked = pool[torch.randperm(pool.shape[0], generator=generator)[:n]].float() / 255.0
    if size == picked.shape[-1]:
        return picked
    return F.interpolate(picked[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def degrade(clean: Tensor, blur: Tensor, noise: float, generator: torch.Generator) -> Tensor:
    """``y = k * x + noise * N(0, I)`` with the circular blur ``blur``."""
    y = convolve(clean, transfer(blur.to(clean.dtype), clean.shape[-2:]))
    return y + noise * torch.randn(clean.shape, generator=generator, dtype=torch.float64).to(clean.dtype)


def load_images(dataset: str, *, n_train: int, n_test: int, size: int, blur_sigma: float, noise: float, seed: int,
                data_dir: str | None = None, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Images:
    """Training and held-out pairs drawn with ``seed`` (MNIST: training and test digits respectively)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    g = torch.Generator().manual_seed(seed)
    if dataset == "shapes":
        clean = shapes(n_train + n_test, size, g)
        train, test = clean[:n_train], clean[n_train:]
    else:
        train = mnist_images(n_train, size, g, data_dir, train=True)
        test = mnist_images(n_test, size, g, data_dir, train=False)
    blur = gaussian_kernel(blur_sigma, dtype=torch.float64)
    train, test = train.double(), test.double()
    pairs = (train, degrade(train, blur, noise, g), test, degrade(test, blur, noise, g))
    return Images(*(t.to(device=device, dtype=dtype) for t in pairs))
