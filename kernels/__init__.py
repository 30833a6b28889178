"""Triton kernels of adaperceiver, installed as ``adaperceiver.kernels``."""
