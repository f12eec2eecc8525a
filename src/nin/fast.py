"""The fast NiN recipe, after airbench (Keller Jordan's CIFAR-10 speed runs), in one file.

It needs torch alone: copy it into another project as it is. nin trains `--preset cifar10-fast`
through it (nin.models registers `nin_fast`, nin.train calls the rest); there is no other copy.

- `nin_fast`: the network: a 2×2 whitening convolution, three NiN blocks (a 3×3 convolution
  pooled 2×2 before its batch norm, then 1×1 convolutions), a 1×1 class-map convolution and
  global average pooling; no dense layer.
- `init_whitening_`: set the first convolution to whiten image patches (PCA of the data);
- `param_groups`: per-parameter learning rates (batch-norm shifts; the authors' multipliers);
- `lr_scheduler`: one-cycle, or airbench's linear warm-up and decay, per step;
- `Lookahead`: every few steps, pull the weights towards their running average, and end on it;
- `tta_logits`: average the logits over flipped and shifted copies of each test image;
- `RECIPE`: the settings nin's `cifar10-fast` preset trains with (chosen on a validation split).

One step of the recipe, as nin runs it::

    model = nin_fast()
    init_whitening_(model, train_images[:5000])  # normalised floats, (N, 3, 32, 32)
    groups = param_groups(model, RECIPE["lr"], RECIPE["weight_decay"], RECIPE["bias_lr_scale"])
    optimizer = torch.optim.SGD(groups, momentum=RECIPE["momentum"], nesterov=True)
    scheduler = lr_scheduler(optimizer, "linear", total_steps)
    lookahead = Lookahead(model, RECIPE["lookahead"], total_steps)
    for step, (x, y) in enumerate(batches, 1):  # flipped and translated 2 pixels at random
        loss = F.cross_entropy(model(x), y, label_smoothing=RECIPE["label_smoothing"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        lookahead.step(model, step)
    logits = tta_logits(model.eval(), test_images, RECIPE["tta"])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The settings of nin's `cifar10-fast` preset beside its model (nin_fast), data set (cifar10),
# whitening init and linear schedule; the rest of the preset is nin's modern recipe (Nesterov
# momentum, normalised inputs, bfloat16, channels-last).
RECIPE = dict(
    epochs=9,
    lr=1.5,  # airbench's 11.5 per 1024 examples (summed loss), for a mean loss
    batch_size=1024,
    momentum=0.85,
    weight_decay=0.0013,  # airbench's 0.0153 per 1024 examples, decoupled from the lr
    bias_lr_scale=64.0,
    label_smoothing=0.2,
    flip=True,
    crop_padding=2,
    lookahead=5,
    tta=2,
)


class Scale(nn.Module):
    """Multiply by a constant: tempers the class maps of a batch-normed net at the start."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


# Each makes a new layer (ReLU in place, as everywhere in nin).
ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU}


def fast_block(
    c_in: int, c_out: int, num_pointwise: int, act: Callable[[], nn.Module]
) -> nn.Sequential:
    """A NiN block: a 3×3 convolution, 2×2 max-pooling (before its batch norm, so the rest
    works on a quarter of the positions), then `num_pointwise` 1×1 convolutions, each with batch
    norm and the activation."""
    layers = [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False), nn.MaxPool2d(2)]
    for i in range(num_pointwise + 1):
        if i:
            layers.append(nn.Conv2d(c_out, c_out, 1, bias=False))
        layers += [nn.BatchNorm2d(c_out), act()]
    return nn.Sequential(*layers)


def nin_fast(
    num_classes: int = 10,
    in_channels: int = 3,
    widths: tuple[int, int, int] = (64, 256, 256),
    num_pointwise: int = 1,
    activation: str = "gelu",
    batch_norm_momentum: float = 0.4,
    logit_scale: float = 1 / 9,
) -> nn.Sequential:
    """The fast NiN for 32×32 colour images: airbench's layout with NiN blocks.

    The 2×2 first convolution goes to 2·C·4 maps (`init_whitening_` sets it from the data).
    Batch norm learns its shift only (scale fixed at 1) and follows the batch fast
    (`batch_norm_momentum`); every convolution after the first starts as the identity on its
    first channels (Dirac).
    """
    if activation not in ACTIVATIONS:
        known = ", ".join(ACTIVATIONS)
        raise ValueError(f"unknown activation {activation!r}; choose one of: {known}")
    if num_pointwise < 0:
        raise ValueError(f"num_pointwise must be 0 or more, got {num_pointwise}")
    act = ACTIVATIONS[activation]
    whiten = 2 * in_channels * 2 * 2
    first = nn.Sequential(nn.Conv2d(in_channels, whiten, 2), act())
    blocks, c = [], whiten
    for width in widths:
        blocks.append(fast_block(c, width, num_pointwise, act))
        c = width
    for module in nn.Sequential(*blocks).modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = batch_norm_momentum
            module.weight.requires_grad_(False)
        elif isinstance(module, nn.Conv2d):
            w = module.weight.data
            nn.init.dirac_(w[: min(w.shape[:2])])
    head = [nn.Conv2d(c, num_classes, 1, bias=False), Scale(logit_scale)]
    return nn.Sequential(first, *blocks, *head, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())


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
        raise ValueError(
            f"whitening needs a first convolution from {c} to {2 * c * h * w} channels "
            f"(2 × channels × {h}×{w}); {type(model).__name__}'s goes {conv.in_channels} → "
            f"{conv.out_channels}"
        )
    patches = images.float().unfold(2, h, 1).unfold(3, w, 1)  # (N, C, H', W', h, w)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * h * w)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).flip(0).view(-1, c, h, w)
    conv.weight.copy_(torch.cat([filters, -filters]).to(conv.weight))
    conv.weight.requires_grad_(False)


def lr_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The per-step learning-rate schedule: None (constant), one-cycle (cosine, 30% warm-up),
    or linear (airbench's: from 0.2× up to the peak over 23% of the steps, down to 0.07×)."""
    if schedule == "constant":
        return None
    peaks = [group["lr"] for group in optimizer.param_groups]
    # cycle_momentum=False: the momentum that runs is the one the optimizer was given.
    shape = (
        dict(pct_start=0.23, anneal_strategy="linear", div_factor=5, final_div_factor=0.2 / 0.07)
        if schedule == "linear"
        else {}
    )
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=peaks, total_steps=total_steps, cycle_momentum=False, **shape
    )


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
