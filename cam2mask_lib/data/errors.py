"""The data layer's error: input that does not have the expected form."""
from __future__ import annotations

from ..utils import UserError


class DataError(UserError, ValueError):
    """Input data that does not have the expected form. The message names the file, the line or
    item, and what was expected."""
