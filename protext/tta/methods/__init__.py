"""The declarations of every test-time adaptation method, one module each (see :mod:`..registry`).

Importing this package registers them, in the order ``--tta`` lists them. No module here imports
torch; each one's ``build`` imports its algorithm (``protext/tta/NAME.py``) when an adapter is made.
"""

from . import tpt, ctpt, otpt, zero, tda, mta, dmn, dpe, boost, tps  # noqa: F401  (registration order)
