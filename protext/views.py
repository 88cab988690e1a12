"""Deprecated location: the test-time views live in :mod:`protext.tta.views` (old imports keep working)."""

from .tta.views import *  # noqa: F401,F403
from .tta.views import view_transform_for  # noqa: F401
