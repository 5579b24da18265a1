"""Classification metrics from sums that add over batches and ranks: top-1/top-5, negative
log-likelihood and expected calibration error (ECE, Guo et al. 2017: 15 equal-width
confidence bins, the gap between accuracy and mean confidence weighted by each bin's share).

A rank adds `prediction_sums` of each batch on the device (no host sync per batch); one
all_reduce of the sums gives every rank the metrics of the whole set, exactly as one process
would count them.
"""
from __future__ import annotations

import torch

ECE_BINS = 15
SUMS_SIZE = 4 + 3 * ECE_BINS
"""images, top-1 hits, top-5 hits, NLL sum; then per confidence bin: images, confidence sum, hits."""


def prediction_sums(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 sums (SUMS_SIZE) of one batch's predicted log-probabilities (batch x classes)."""
    top = log_probs.topk(min(5, log_probs.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    correct = hits[:, 0].double()
    confidence = log_probs.gather(1, top[:, :1]).squeeze(1).double().exp()
    nll = -log_probs.gather(1, labels[:, None]).double().sum()
    # Bin b holds confidences in (b / 15, (b + 1) / 15].
    bins = (confidence * ECE_BINS).ceil().long().clamp(1, ECE_BINS) - 1
    table = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=log_probs.device)
    table.index_add_(1, bins, torch.stack([torch.ones_like(correct), confidence, correct]))
    head = torch.stack([correct.new_tensor(float(len(labels))), correct.sum(), hits.any(1).double().sum(), nll])
    return torch.cat([head, table.reshape(-1)])


def metrics_from_sums(sums: torch.Tensor) -> dict[str, float]:
    """top1, top5, nll (mean per image), ece, and confidence (the mean top-1 probability:
    below top1 the predictions are underconfident, above it overconfident) from (reduced)
    `prediction_sums`."""
    sums = sums.double().cpu()
    n, top1, top5, nll = sums[:4].tolist()
    _, confidence, correct = sums[4:].view(3, ECE_BINS)
    return {"top1": top1 / n, "top5": top5 / n, "nll": nll / n, "ece": (correct - confidence).abs().sum().item() / n,
            "confidence": confidence.sum().item() / n}
