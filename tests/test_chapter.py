"""`--preset d2l` is the chapter: its training steps are those of d2l's `train_ch6`, bit for bit.

The chapter's network, initialisation and training loop are transcribed below in plain
PyTorch, as the chapter writes them. `nin train --preset d2l` (the real `train`, on a small
subset) and the transcription start from the same weights and take the same batches with the
same dropout masks; every step's logits and loss, and the final weights, must be identical.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import nin.train
from nin.config import make_config

# Momentum shows from step 3 on (its first step is plain SGD's); a step of 8 images at 224×224
# takes about half a second on 2 CPU cores.
STEPS, BATCH = 4, 8

# What makes the preset the chapter: `lr, num_epochs, batch_size = 0.1, 10, 128`,
# `load_data_fashion_mnist(batch_size, resize=224)`, and train_ch6's Xavier init, plain SGD
# (no momentum, no weight decay), unsmoothed cross-entropy, float32, a constant learning rate,
# no augmentation and no normalisation (ToTensor's [0, 1] pixels).
CHAPTER = dict(
    model="nin_d2l", model_kwargs={}, dataset="fashion-mnist", epochs=10, lr=0.1, batch_size=128,
    resize=224, init="xavier", momentum=0.0, nesterov=False, weight_decay=0.0,
    schedule="constant", label_smoothing=0.0, flip=False, crop_padding=0, normalize=False,
    amp=False, channels_last=False, compile=False, fused=False, bias_lr_scale=1.0, lookahead=0,
    tta=0, holdout=0, train_subset=None, test_subset=None,
)  # fmt: skip


# --- The chapter, transcribed ------------------------------------------------------------------


def nin_block(in_channels, out_channels, kernel_size, strides, padding):
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, strides, padding),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size=1),
        nn.ReLU(),
    )


def chapter_net():
    return nn.Sequential(
        nin_block(1, 96, kernel_size=11, strides=4, padding=0),
        nn.MaxPool2d(3, stride=2),
        nin_block(96, 256, kernel_size=5, strides=1, padding=2),
        nn.MaxPool2d(3, stride=2),
        nin_block(256, 384, kernel_size=3, strides=1, padding=1),
        nn.MaxPool2d(3, stride=2),
        nn.Dropout(0.5),
        # There are 10 label classes
        nin_block(384, 10, kernel_size=3, strides=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)),
        # Transform the four-dimensional output into two-dimensional output with a shape of
        # (batch size, 10)
        nn.Flatten(),
    )


def init_weights(m):  # train_ch6's
    if type(m) == nn.Linear or type(m) == nn.Conv2d:  # noqa: E721 (the chapter's test)
        nn.init.xavier_uniform_(m.weight)


# -----------------------------------------------------------------------------------------------


def test_the_d2l_preset_has_the_chapters_settings():
    config = make_config("d2l")
    assert {k: getattr(config, k) for k in CHAPTER} == CHAPTER


def test_d2l_preset_steps_equal_the_chapters_train_ch6(data_dir, tmp_path, monkeypatch):
    config = make_config(
        "d2l", data_dir=str(data_dir), out=str(tmp_path / "run"), epochs=1, device="cpu",
        train_subset=STEPS * BATCH, batch_size=BATCH, test_subset=BATCH,
    )  # fmt: skip
    seen = {}  # what `train` did: the random state its model was built from, and every step
    steps = []
    real_build, real_step = nin.train.build_model, nin.train.train_step

    def build_model(*args, **kwargs):
        seen["init_rng"] = torch.get_rng_state()
        return real_build(*args, **kwargs)

    def train_step(model, x, y, optimizer, loss_fn, amp, scaler=None):
        if not steps:
            seen["initial"] = copy.deepcopy(model.state_dict())
            seen["optimizer"], seen["loss_fn"], seen["amp"] = optimizer, loss_fn, amp
            seen["training"] = model.training
        rng = torch.get_rng_state()  # dropout's masks come from it
        logits = real_step(model, x, y, optimizer, loss_fn, amp, scaler)
        steps.append((x.clone(), y.clone(), rng, logits.clone()))
        return logits

    monkeypatch.setattr(nin.train, "build_model", build_model)
    monkeypatch.setattr(nin.train, "train_step", train_step)
    result = nin.train.train(config, log=lambda line: None)
    assert len(steps) == STEPS

    # What `train` ran with: plain SGD at lr 0.1, unsmoothed cross-entropy, float32, training mode.
    optimizer = seen["optimizer"]
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0, 0)
    assert (group["dampening"], group["nesterov"], group["maximize"]) == (0, False, False)
    assert seen["loss_fn"].label_smoothing == 0 and seen["loss_fn"].reduction == "mean"
    assert seen["amp"] is False and seen["training"] is True
    for x, _, _, logits in steps:
        assert x.shape == (BATCH, 1, 224, 224) and x.dtype == torch.float32
        assert x.is_contiguous() and x.min() >= 0 and x.max() <= 1  # ToTensor's [0, 1] pixels
        assert logits.dtype == torch.float32

    # The chapter: its network, from the random state `train` built its model from, then
    # train_ch6's init; the same weights as `train` started with.
    torch.set_rng_state(seen["init_rng"])
    net = chapter_net()
    net.apply(init_weights)
    initial = seen["initial"]
    assert list(net.state_dict()) == list(initial)
    for name, value in net.state_dict().items():
        assert torch.equal(value, initial[name]), f"initial {name}"

    # train_ch6's loop over the same batches, with the same dropout masks.
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = nn.CrossEntropyLoss()
    net.train()
    ours, chapters = [], []
    for X, y, rng, logits in steps:
        torch.set_rng_state(rng)
        optimizer.zero_grad()
        y_hat = net(X)
        l = loss(y_hat, y)  # noqa: E741 (the chapter's name)
        l.backward()
        optimizer.step()
        assert torch.equal(y_hat.detach(), logits), f"step {len(chapters) + 1}: other logits"
        ours.append(F.cross_entropy(logits, y).item())
        chapters.append(l.item())
    assert ours == chapters
    assert len(set(chapters)) == STEPS  # the weights moved at every step
    trained = result["model"].state_dict()
    for name, value in net.state_dict().items():
        assert torch.equal(value, trained[name]), f"trained {name}"
