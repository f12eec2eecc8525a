"""Fast-training pieces, after airbench (Keller Jordan's CIFAR-10 speed runs), for any NiN.

Each is a small function or object the training loop calls at one place:
- `init_whitening_`: set the first convolution to whiten image patches (PCA of the data);
- `param_groups`: per-parameter learning rates (batch-norm shifts; the authors' multipliers);
- `Lookahead`: every few steps, pull the weights towards their running average, and end on it;
- `tta_logits`: average the logits over flipped and shifted copies of each test image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nin.errors import NinError


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The model's first convolution (every NiN starts with one)."""
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


@torch.no_grad()
def init_whitening_(model: nn.Module, images: Tensor, eps: float = 5e-4) -> None:
    """Make the first convolution whiten its k×k patches of `images` (normalised floats).

    Its filters become the eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue),
    and their negatives (so a ReLU/GELU after it loses nothing). The weights stay fixed
    (`requires_grad` off); the bias still trains.
    """
    conv = first_conv(model)
    c, (h, w) = images.shape[1], conv.kernel_size
    if conv.out_channels != 2 * c * h * w or conv.in_channels != c:
        raise NinError(
            f"whitening needs a first convolution from {c} to {2 * c * h * w} channels "
            f"(2 × channels × {h}×{w}); {type(model).__name__}'s goes {conv.in_channels} → "
            f"{conv.out_channels}: use --init default"
        )
    patches = images.float().unfold(2, h, 1).unfold(3, w, 1)  # (N, C, H', W', h, w)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).flip(0).view(-1, c, h, w)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))
    conv.weight.requires_grad_(False)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    bias_lr_scale: float = 1.0,
    paper_lr: bool = False,
) -> list[dict]:
    """Optimizer groups, one per (lr, weight decay) pair, in the model's parameter order.

    - `bias_lr_scale`: batch-norm shifts at that multiple of the lr, their weight decay divided
      by it, so every parameter decays by the same fraction per step (airbench's bias scaler).
    - `paper_lr`: the authors' Caffe multipliers: every other bias at 2× the lr without weight
      decay, and a layer the network marks with `lr_scale` (nin_cifar's last 1×1 convolution,
      the authors' cccp6) at that multiple, weight and bias (its bias without decay).

    Frozen parameters are left out.
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for module in model.modules():
        scale = getattr(module, "lr_scale", 1.0) if paper_lr else 1.0
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            lr_mult, decay_mult = scale, 1.0
            if name == "bias" and is_norm and bias_lr_scale != 1:
                lr_mult, decay_mult = bias_lr_scale, 1 / bias_lr_scale
            elif name == "bias" and paper_lr:  # a marked layer's bias keeps its scale (cccp6: 0.1)
                lr_mult, decay_mult = (2.0 if scale == 1 else scale), 0.0
            groups.setdefault((lr_mult, decay_mult), []).append(param)
    return [
        dict(params=params, lr=lr * lr_mult, weight_decay=weight_decay * decay_mult)
        for (lr_mult, decay_mult), params in groups.items()
    ]


class Lookahead:
    """Every `every` steps, move a running average of the weights (and batch-norm statistics)
    towards the live ones and copy it back into the model (hlb-CIFAR10's lookahead).

    The averaging strength grows as (step / total)³, so early training is left alone and the
    end is smoothed most; `finish` leaves the model on the average.
    """

    def __init__(self, model: nn.Module, every: int, total_steps: int) -> None:
        self.every, self.total_steps = every, total_steps
        self.average = {k: v.detach().clone() for k, v in self.floats(model).items()}

    @staticmethod
    def floats(model: nn.Module) -> dict[str, Tensor]:
        """The model's floating-point weights and buffers, by state-dict name."""
        return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> None:
        """Call after optimizer step `step` (1-based): averages every `every` steps, and after
        the last step leaves the model on the average."""
        if step % self.every == 0:
            decay = 0.95**self.every * (min(step, self.total_steps) / self.total_steps) ** 3
            self.pull(model, decay)
        if step == self.total_steps:
            self.pull(model, 1.0)

    @torch.no_grad()
    def pull(self, model: nn.Module, decay: float) -> None:
        """average ← decay·average + (1 − decay)·live; then live ← average."""
        for name, live in self.floats(model).items():
            self.average[name].lerp_(live, 1 - decay)
            live.copy_(self.average[name])

    def state_dict(self) -> dict[str, Tensor]:
        """The average, by state-dict name."""
        return dict(self.average)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Put back an average saved by `state_dict` (missing names are an error)."""
        for name, value in self.average.items():
            value.copy_(state[name])


TTA_LEVELS = {
    0: "none",
    1: "left-right flip",
    2: "flip and 1-pixel shifts",
    3: "1-pixel shifts, no flip",  # for digits, whose mirror images are other digits
}


def tta_logits(model: nn.Module, x: Tensor, level: int = 0) -> Tensor:
    """Logits of `model` on `x`, averaged over test-time augmentations.

    Level 0: plain. Level 1: the image and its mirror. Level 2: level 1, averaged (half and
    half) with level 1 on the image shifted one pixel up-left and one pixel down-right. Level 3:
    level 2 without the mirrors.
    """

    def view(x: Tensor) -> Tensor:
        return model(x) if level == 3 else (model(x) + model(x.flip(-1))) / 2

    if level == 0:
        return model(x)
    logits = view(x)
    if level == 1:
        return logits
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    shifted = (view(padded[..., :h, :w]) + view(padded[..., 2:, 2:])) / 2
    return (logits + shifted) / 2
