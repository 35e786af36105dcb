"""Inductor lowerings and the Triton kernels they generate for the lychee ops on CUDA."""
