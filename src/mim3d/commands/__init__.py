"""Sub-command groups of the command line, one module each, registered by :mod:`mim3d.cli`.

Each module defines ``register(sub)``, adding its parsers (with ``set_defaults(func=handler)``)
to the ``mim3d`` sub-parser action; handlers stay thin over library functions.
"""
