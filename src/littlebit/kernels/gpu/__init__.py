"""GPU kernels for the packed product: Triton, and CUDA C++ compiled at first use through NVRTC."""
