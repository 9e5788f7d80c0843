"""Mode ``head``: a classifier trained on frozen embeddings (the backbone's L2-normalised pooled features).

Features are standardised with the training set's mean and deviation, then dropout and one linear layer;
cross-entropy with label smoothing, AdamW with a cosine schedule, early stopping on validation top-1 (the best
epoch's weights are kept). The standardisation is folded into the linear layer at the end, so serving is one
``x @ W.T + b`` on the embedding the predictor already computes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["HeadResult", "train_head"]


@dataclass
class HeadResult:
    weight: np.ndarray  # (C, D): applies to the L2-normalised embedding
    bias: np.ndarray  # (C,)
    best_epoch: int
    epochs_run: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # per epoch: train_loss, val_loss, val_top1


def train_head(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, num_classes: int, *,
               epochs: int, lr: float, batch_size: int, dropout: float, label_smoothing: float,
               weight_decay: float, patience: int, seed: int, log=None) -> HeadResult:
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x_train, np.float32))
    yt = torch.from_numpy(np.asarray(y_train, np.int64))
    xv = torch.from_numpy(np.ascontiguousarray(x_val, np.float32))
    yv = torch.from_numpy(np.asarray(y_val, np.int64))
    mean = xt.mean(0)
    std = xt.std(0, unbiased=False).clamp_min(1e-6)
    net = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(xt.shape[1], num_classes))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(xt) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    xt_n, xv_n = (xt - mean) / std, (xv - mean) / std
    best = (-1.0, math.inf)
    best_state, best_epoch, history, stale = None, 0, [], 0
    for epoch in range(1, epochs + 1):
        net.train()
        order = torch.randperm(len(xt_n), generator=gen)
        total = 0.0
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            loss = loss_fn(net(xt_n[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        net.eval()
        with torch.no_grad():
            logits = net(xv_n)
            val_loss = float(torch.nn.functional.cross_entropy(logits, yv)) if len(yv) else math.nan
            top1 = float((logits.argmax(1) == yv).float().mean()) if len(yv) else math.nan
        history.append({"epoch": epoch, "train_loss": round(total / len(xt_n), 5), "val_loss": round(val_loss, 5),
                        "val_top1": round(top1, 5)})
        if log:
            log(f"lens train: epoch {epoch}/{epochs} train_loss {total / len(xt_n):.4f} val_loss {val_loss:.4f} "
                f"val_top1 {top1:.4f}")
        if (top1, -val_loss) > (best[0], -best[1]):
            best, best_epoch, stale = (top1, val_loss), epoch, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            stale += 1
            if patience and stale >= patience:
                break
    net.load_state_dict(best_state)
    w = net[1].weight.detach() / std  # fold the standardisation into the layer
    b = net[1].bias.detach() - w @ mean
    return HeadResult(weight=w.numpy().astype(np.float32), bias=b.numpy().astype(np.float32), best_epoch=best_epoch,
                      epochs_run=len(history), seconds=time.perf_counter() - t0, history=history)
