"""Triton kernels behind :mod:`srcid.ops` (installed as ``srcid.kernels``)."""
