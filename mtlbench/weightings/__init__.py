"""Built-in task weightings, one file each, found by the registry with ``pkgutil``.

A new file here that registers a weighting with ``@register_weighting`` is picked up with no
edit anywhere else. See :mod:`mtlbench.weighting` for the two families and their interface.
"""
