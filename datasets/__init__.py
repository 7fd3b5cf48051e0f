"""Built-in datasets, one file each. Importing this package registers them."""
from mtlbench.datasets import synthetic  # noqa: F401
