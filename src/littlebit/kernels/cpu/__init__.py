"""CPU kernels for the packed product."""
