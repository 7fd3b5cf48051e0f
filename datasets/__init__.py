"""Built-in datasets, one file each, found by the registry with ``pkgutil``.

A new file here that registers a dataset with ``@register_dataset`` is picked up with no
edit anywhere else.
"""
