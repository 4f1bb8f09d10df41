"""ldm: a pure-PyTorch latent diffusion engine.

    from ldm import StableDiffusion
    pipe = StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe("a photograph of an astronaut riding a horse", seed=1).images[0].save("astronaut.png")

The names below are the public API; they stay put while the packages behind them move. They are imported on first
use, so that `import ldm` (and the command line's `--help`) does not import torch.

The packages, each importing only those listed before it (pyproject.toml's import contract checks it):
`networks` and `sampling`, then `loading`, then `adapters` and `speed`, then `pipelines`, `hooks`, `serving`,
`tools`. README.md's "How it is built" says what each holds.
"""

from importlib import import_module

_PUBLIC = {
    "StableDiffusion": "ldm.pipelines.stable_diffusion",
    "StableDiffusionXL": "ldm.pipelines.stable_diffusion",
    "Generation": "ldm.pipelines.stable_diffusion",
    "GenerationRequest": "ldm.pipelines.request",
    "ImagePrompt": "ldm.pipelines.request",
    "BaseWithRefiner": "ldm.pipelines.refiner",
    "Step": "ldm.sampling.samplers",
    "SAMPLERS": "ldm.sampling.samplers",
    "accelerate": "ldm.speed.accelerate",
    "enable_offload": "ldm.speed.offload",
    "enable_vae_tiling": "ldm.speed.tiling",
    "set_seamless": "ldm.adapters.seamless",
    "AttentionMaps": "ldm.hooks.attention_maps",
    "LdmError": "ldm.errors",
    "InputError": "ldm.errors",
    "LoadError": "ldm.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ldm' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
