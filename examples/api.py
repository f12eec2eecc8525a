"""nin from Python: the chapter's network, its shape table, and the bundled model.

Run from the repository's root: `python examples/api.py`.
"""

import torch

import nin
from nin.predict import load_predictor, predict_files
from nin.resources import format_summary, summarize

net = nin.create_model("nin_d2l")  # the chapter's NiN: 1 channel in, 10 classes out
print(net(torch.rand(2, 1, 224, 224)).shape)  # torch.Size([2, 10])
print(format_summary(summarize(net, (1, 224, 224))).splitlines()[-1])

ablation = nin.create_model("nin_d2l", num_pointwise=1, batch_norm=True)  # exercise 2's kind
print(sum(p.numel() for p in ablation.parameters()), "parameters with one 1×1 per block")

predictor = load_predictor(bundled="fashion-mnist")  # the trained model inside the package
for prediction in predict_files(predictor, ["examples/test-0.png", "examples/photo.jpg"], top_k=2):
    print(prediction.source, prediction.top)  # [(class index, class name, probability), ...]
