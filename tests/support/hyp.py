"""Example counts that follow the hypothesis profile.

A test that needs more examples than the profile's default asks for ``examples(n)``: ``n``
under the ``ci`` profile (60 examples by default), scaled by the profile's ``max_examples``
otherwise. ``fast`` (``scripts/test --fast``) runs a quarter, ``thorough`` many times more.
"""

from hypothesis import settings

_CI_EXAMPLES = 60


def examples(n: int) -> int:
    """``n`` examples at the ``ci`` profile, scaled to the loaded profile (at least 5)."""
    scale = settings().max_examples / _CI_EXAMPLES
    return max(5, round(n * scale))
