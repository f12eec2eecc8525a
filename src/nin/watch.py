"""The watch on a training run: it stops a run that has diverged, collapsed or got stuck, and
reads the device once per window of steps, never once per step."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from nin.errors import NinError


class TrainingWatch:
    """Spots a failed run early: a non-finite loss, a collapse, or a loss stuck at chance.

    Collapse is the chapter's failure: when the ReLU before global average pooling dies (or
    any whole ReLU layer), every image gets the same logits, accuracy sits at chance, the loss
    near ln(classes), and no gradient can revive it. A run can also be stuck there without
    identical logits. The watch keeps its sums on the device and reads them once per `window`
    steps (or when `poll` is called before a checkpoint), so it costs no sync per step.
    """

    def __init__(
        self,
        collapse_steps: int,
        stuck_steps: int,
        num_classes: int,
        device: torch.device,
        reduce: Callable[..., torch.Tensor] | None = None,
        window: int = 50,
    ) -> None:
        self.collapse_steps, self.stuck_steps = collapse_steps, stuck_steps
        self.num_classes = num_classes
        # Sums over every process under torchrun (`reduce(t, op)`, op 'sum' or 'max').
        self.reduce = reduce or (lambda t, op="sum": t)
        self.window = max(1, min([window, *(s for s in (collapse_steps, stuck_steps) if s)]))
        # Since the last poll: largest spread of logits; loss sum, correct, non-finite losses.
        self.spread = torch.zeros((), device=device)
        self.sums = torch.zeros(3, device=device)
        self.pending = 0  # steps since the last poll
        self.count = 0  # examples since the last poll
        self.flat = 0  # consecutive steps with the same logits for every image
        self.stuck = 0  # consecutive steps with loss ≈ ln(classes) and accuracy ≈ chance
        self.reason = ""

    def update(self, logits: torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor) -> bool:
        """Record one step (logits, summed loss, correct count); True once the run has failed."""
        spread = (logits - logits[:1]).abs().amax().float()
        torch.maximum(self.spread, spread, out=self.spread)
        self.sums[0] += loss_sum
        self.sums[1] += correct
        self.sums[2] += ~torch.isfinite(loss_sum)
        self.pending += 1
        self.count += len(logits)
        return self.pending >= self.window and self.poll()

    def poll(self, model: nn.Module | None = None) -> bool:
        """Read the sums since the last poll (one sync); True once the run has failed.

        Given `model`, also check its weights are finite: a step can blow them up after its
        loss was computed, and no checkpoint may hold such weights.
        """
        if self.pending:
            spread = self.reduce(self.spread, "max").item()
            count = torch.tensor([float(self.count)], device=self.sums.device)
            sums = self.reduce(torch.cat([self.sums, count]))
            loss, correct, nonfinite, count = sums.tolist()
            steps, self.pending, self.count = self.pending, 0, 0
            self.spread.zero_(), self.sums.zero_()
            chance = math.log(self.num_classes)
            self.flat = self.flat + steps if spread == 0 else 0
            stuck = abs(loss / count - chance) < 0.05 and correct / count < 1.5 / self.num_classes
            self.stuck = self.stuck + steps if stuck else 0
            if nonfinite or not math.isfinite(loss):
                self.reason = "diverged"
            elif self.collapse_steps and self.flat >= self.collapse_steps:
                self.reason = "collapsed"
            elif self.stuck_steps and self.stuck >= self.stuck_steps:
                self.reason = "stuck"
        if model is not None and not self.reason:
            blown = torch.stack([~p.isfinite().all() for p in model.parameters()]).sum()
            if self.reduce(blown).item():
                self.reason = "diverged"
        return bool(self.reason)

    def state_dict(self) -> dict[str, int]:
        """The counters a resume needs (call `poll` first)."""
        return {"flat": self.flat, "stuck": self.stuck}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Put back the counters of `state_dict`."""
        self.flat, self.stuck = int(state["flat"]), int(state["stuck"])

    def error(self, epoch: int, lr: float, last: Path) -> NinError:
        """What happened, what was kept (`last`, if it exists), and what to try, in one line."""
        kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint yet"
        ln = f"ln {self.num_classes} = {math.log(self.num_classes):.3f}"
        what = {
            "diverged": "the loss became infinite or NaN (the weights blew up)",
            "collapsed": f"every image has got the same logits for the last {self.flat} steps, "
            f"so accuracy is stuck at chance and the loss near {ln} (a ReLU layer, usually the "
            "one before global average pooling, died and cannot recover)",
            "stuck": f"the loss has stayed at {ln} with accuracy at chance for {self.stuck} steps",
        }[self.reason]
        fix = f"try a lower --lr (now {lr}) or another --seed"
        if self.reason != "diverged":
            fix += ", or --preset compact (batch norm, no ReLU before pooling)"
        return NinError(f"training {self.reason} in epoch {epoch}: {what}; {kept}; {fix}")
