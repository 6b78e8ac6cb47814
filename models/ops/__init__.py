"""Plain-PyTorch kernels, each with a naive reference beside it."""
