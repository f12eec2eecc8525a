"""Evaluation: one pass of a model over a loader, as a confusion matrix (and, when asked, every
prediction with its confidence), with test-time augmentation (`nin.fast.tta_logits`) when asked.
Training, `nin eval`, the report and the exercises all use it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nin.device import autocast
from nin.errors import NinError
from nin.fast import tta_logits
from nin.loaders import DeviceLoader


@dataclass
class Evaluation:
    """A confusion matrix (true class × predicted class, on the CPU), and, if asked for, each
    example's predicted class and its probability, in the loader's order."""

    confusion: torch.Tensor
    predicted: torch.Tensor | None = None
    confidence: torch.Tensor | None = None

    @property
    def accuracy(self) -> float:
        """Overall accuracy."""
        return accuracy(self.confusion)

    @property
    def per_class(self) -> list[float]:
        """Accuracy of each true class (recall)."""
        totals = self.confusion.sum(1).clamp(min=1)
        return (self.confusion.diag() / totals).tolist()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: DeviceLoader,
    num_classes: int,
    amp: bool = False,
    tta: int = 0,
    predictions: bool = False,
) -> Evaluation:
    """Evaluate `model` over `loader` with test-time augmentation at level `tta` (see
    `tta_logits`); with `predictions`, keep every example's prediction and confidence."""
    model.eval()
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=loader.device)
    predicted, confidence = [], []
    for x, y in loader:
        with autocast(loader.device, amp):
            logits = tta_logits(model, x, tta)
        probs, guess = logits.float().softmax(1).max(1)
        confusion += torch.bincount(y * num_classes + guess, minlength=num_classes**2)
        if predictions:
            predicted.append(guess)
            confidence.append(probs)
    result = Evaluation(confusion.view(num_classes, num_classes).cpu())
    if predictions:
        result.predicted = torch.cat(predicted).cpu() if predicted else torch.zeros(0).long()
        result.confidence = torch.cat(confidence).cpu() if confidence else torch.zeros(0)
    return result


def accuracy(confusion: torch.Tensor) -> float:
    """Overall accuracy from a confusion matrix."""
    return confusion.trace().item() / max(confusion.sum().item(), 1)


def check_input(model: nn.Module, x: torch.Tensor, name: str) -> None:
    """Fail fast, in one line, if `model` (named `name`) cannot take the batch `x`."""
    try:
        with torch.no_grad():
            model.eval()(x[:1])
    except RuntimeError as e:
        raise NinError(
            f"model {name!r} cannot take input {tuple(x.shape[1:])} ({str(e).splitlines()[0]}); "
            "use --resize 224 for nin_d2l, or pick a model for this size"
        ) from None
