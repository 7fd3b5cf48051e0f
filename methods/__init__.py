"""Built-in methods, one file each. Importing this package registers them."""
from mtlbench.methods import cross_stitch, hard, separate, stl, tr  # noqa: F401
