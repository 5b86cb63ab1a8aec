"""Public test support: daemon and registry fixtures, offline test images, CRI helpers.

Tests under ``test/`` and benchmarks under ``hack/bench`` import from here and
never from each other.
"""
