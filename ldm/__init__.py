"""ldm: a pure-PyTorch latent diffusion engine."""
