"""``fashion-mnist``: Zalando's clothing images as 10 one-vs-rest tasks.

Source: torchvision's ``FashionMNIST`` (Xiao, Rasul, Vollgraf, arXiv 1708.07747). Licence:
MIT. 60,000 training and 10,000 test images, 28x28 grayscale, in MNIST's IDX format.

Expected layout under the data root (torchvision's, or the same in lowercase)::

    FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]

Only the split being read must be present; ``.gz`` files are extracted as for ``mnist``.
Tasks, in order: t-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag,
ankle boot (torchvision's class order), about 10% positives each.
"""
from __future__ import annotations

import torchvision

from mtlbench.datasets.mnist import IdxDigits
from mtlbench.registry import register_dataset


@register_dataset("fashion-mnist", "Fashion-MNIST clothing: 10 one-vs-rest tasks (torchvision FashionMNIST).")
class FashionMNIST(IdxDigits):
    name = "fashion-mnist"
    torchvision_class = torchvision.datasets.FashionMNIST
    folder = "FashionMNIST"
    classes = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
               "ankle_boot"]
    mean, std = (0.2860,), (0.3530,)
    default_budget = {"epochs": 5}  # not measured here (no files): harder classes than MNIST's
