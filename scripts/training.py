"""What the training scripts share: seeding and the supervised epoch loop (torch).

Used by ``train_digits.py``, ``train_zoo.py`` and ``export_test_nets.py``; each keeps its own
data, networks and augmentation. The loop's order of random draws is part of what makes the
shipped models byte-reproducible, so it is written once here.
"""

from __future__ import annotations

import random
from typing import Callable, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def set_determinism(seed: int, threads: int = 2) -> None:
    """Seed every RNG; deterministic CPU kernels on ``threads`` threads."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def train_epoch(model: nn.Module, xt: torch.Tensor, yt: torch.Tensor, batch: int,
                opt: torch.optim.Optimizer, sched, gen: torch.Generator,
                augment: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[float, int]:
    """One pass over ``xt`` in an order drawn from ``gen``: ``augment`` on each batch,
    cross-entropy, one optimizer and one scheduler step per batch.

    Returns ``(summed loss, correct predictions)`` over the epoch.
    """
    model.train()
    perm = torch.randperm(len(xt), generator=gen)
    loss_sum, correct = 0.0, 0
    for s in range(0, len(xt), batch):
        idx = perm[s:s + batch]
        xb, yb = augment(xt[idx]), yt[idx]
        logits = model(xb)
        loss = F.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_sum += loss.item() * len(idx)
        correct += int((logits.argmax(1) == yb).sum())
    return loss_sum, correct
