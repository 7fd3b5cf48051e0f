"""Built-in methods, one file (or package) each, found by the registry with ``pkgutil``.

A new file here that registers a method with ``@register_method`` is picked up with no
edit anywhere else.
"""
