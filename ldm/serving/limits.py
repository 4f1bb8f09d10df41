"""The limits a scoring request is held to (the server's `--max-*` flags). Importable without torch, so that
`ldm serve --help` shows their defaults at once."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one scoring request may ask for (the server's flags)."""

    max_rows: int = 16
    max_steps: int = 150
    max_pixels: int = 1024 * 1024  # width × height of one image
    max_images_per_prompt: int = 4
