"""A tiny few-shot image problem shared by tests that compare meta-gradients in float64."""
import torch
from torch import nn


def tiny_convnet(ways: int) -> nn.Sequential:
    """conv (stride 2) → batch norm (batch statistics) → ReLU → linear, on 1×8×8 inputs, float64."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, ways)).double()


def image_tasks(tasks: int, ways: int, shots: int, queries: int, seed: int = 1):
    """(support_x ``[T, ways·shots, 1, 8, 8]``, support_y, query_x ``[T, ways·queries, 1, 8, 8]``,
    query_y), uniform float64 images, labels in class order."""
    g = torch.Generator().manual_seed(seed)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    support_x = torch.rand(tasks, ways * shots, 1, 8, 8, generator=g, dtype=torch.float64)
    query_x = torch.rand(tasks, ways * queries, 1, 8, 8, generator=g, dtype=torch.float64)
    return support_x, support_y, query_x, query_y
