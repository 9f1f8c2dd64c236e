"""``fastsae.reference``: the NumPy oracle, kept at its public name.

The module itself lives at :mod:`fastsae.backends.reference` beside the other
backends; this name is the same module object (``fastsae.reference is
fastsae.backends.reference``), so attribute access, monkeypatching and
``from fastsae.reference import ...`` all see one module.
"""

import sys

from .backends import reference as _reference

sys.modules[__name__] = _reference
