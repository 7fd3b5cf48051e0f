"""Built-in datasets, one file each. Importing this package registers them."""
from mtlbench.datasets import (  # noqa: F401
    celeba, cifar10, cifar100, cub200, fashion_mnist, mnist, omniglot, synthetic)
