"""The input Hessian as an operator, its spectrum (exact and Lanczos paths) and feature geometry."""
