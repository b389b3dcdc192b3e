"""Tests against the real engines (`make test-engines`): each runs in its engine's own virtualenv.

Every test module here starts with `pytest.importorskip(<engine>)`, so the project's own `make test`,
where no engine is installed, skips them. What the tests stub is listed in each module's docstring:
only CUDA-only kernels, each marked where it is stubbed.
"""
