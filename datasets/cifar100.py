"""``cifar100``: CIFAR-100 as 100 one-vs-rest tasks over the fine labels.

Source: torchvision's ``CIFAR100`` (Krizhevsky, 2009). Licence: no explicit licence;
distributed for research by its authors. 50,000 training and 10,000 test images, 32x32 RGB.

Expected layout under the data root (torchvision's)::

    cifar-100-python/train, test, meta

Only the split being read (and ``meta``) must be present; files are MD5-checked as for
``cifar10``. Tasks, in order: the 100 fine classes in torchvision's order (apple, aquarium
fish, baby, ...), 1% positives each: balanced accuracy is the headline metric.
"""
from __future__ import annotations

import torchvision

from mtlbench.datasets.cifar10 import CifarTasks
from mtlbench.registry import register_dataset


@register_dataset("cifar100", "CIFAR-100: 100 one-vs-rest tasks over the fine labels (torchvision CIFAR100).")
class CIFAR100(CifarTasks):
    name = "cifar100"
    torchvision_class = torchvision.datasets.CIFAR100
    max_tasks = 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
