"""mtlbench: multi-task learning methods compared as the number of tasks grows."""

__version__ = "0.1.0"
