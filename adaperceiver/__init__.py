"""adaperceiver: fast, exact AdaPerceiver (arXiv 2511.18105) with custom kernels."""
from .ops import use_backend  # noqa: F401
