"""Optional Triton kernels for ldm, installed as `ldm_kernels` (see README.md here)."""
