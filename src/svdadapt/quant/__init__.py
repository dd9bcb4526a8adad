"""Quantization: ``quantized`` (planning with a quantized base: QPiSSA and its kin, EoRA from a full-precision
model) and ``compress`` (simulated compression for EoRA: ``svdadapt.compress.quantize`` / ``prune``). Imports
``core``, ``modules`` and ``engine``.
"""
