"""Previews of a run in progress: every N steps, the denoiser's estimate of the final image (x0) decoded and
written beside the output (`ldm generate --preview-every N`), by the model's VAE or by TAESD (`--preview-vae`,
A1111's "TAESD" live preview: a fraction of a full decode's cost).

    pipe(request, callbacks=[Previews(pipe, Path("out.png"), every=5)])   # out-step005.png, out-step010.png, …
"""

from pathlib import Path

from ldm.pipelines.images import numbered_paths, save_png


class Previews:
    """A step callback that decodes the denoiser's x0 estimate every `every` steps into OUT-stepNNN.png (with
    several images: OUT-stepNNN-1.png, …): how the image forms, at the cost of one VAE decode each time."""

    def __init__(self, pipe, out: Path, every: int, vae=None):
        self.pipe, self.out, self.every, self.passes = pipe, out, every, 0
        self.vae = vae  # the decoder of the previews (None: the pipeline's VAE)

    def begin(self, total: int) -> None:
        """A pass begins: a hires fix's second pass (or a refiner's part) writes OUT-pass2-stepNNN.png."""
        self.passes += 1

    def __call__(self, step) -> None:
        done = step.i + 1
        if done % self.every:  # (each step asked for comes once, PNDM's doubled one too)
            return
        images = self.pipe.decode(step.denoised, self.vae)
        run = f"-pass{self.passes}" if self.passes > 1 else ""
        base = self.out.with_name(f"{self.out.stem}{run}-step{done:03d}{self.out.suffix}")
        for picture, path in zip(images, numbered_paths(base, len(images)), strict=True):
            save_png(picture, path, f"preview after step {done} of {step.total}")
