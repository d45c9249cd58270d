"""Triton kernels of dcr-fast, importable as ``dcr_fast.kernels``.

Each module holds the ``@triton.jit`` kernels of one op and the host functions that launch
them; the autograd wrappers and public API live in the ``dcr_fast`` module of the same name.
"""
