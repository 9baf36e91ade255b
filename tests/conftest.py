"""Test-wide settings, loaded before any test module is imported.

Hypothesis is derandomised: every run, in CI and on a laptop, tries the same examples (seeded from each test's
own source), so a red CI run is reproducible and a green one is not luck. ``print_blob`` prints the
``@reproduce_failure`` line of any failure. ``HYPOTHESIS_PROFILE=explore`` searches with fresh random examples
(and Hypothesis' example database) when you want to look for new failures locally.
"""

from __future__ import annotations

import os

try:
    from hypothesis import settings
except ImportError:  # hypothesis belongs to the test extra; without it no test here uses it
    settings = None

if settings is not None:
    settings.register_profile("ci", derandomize=True, print_blob=True, database=None)
    settings.register_profile("explore", derandomize=False, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
