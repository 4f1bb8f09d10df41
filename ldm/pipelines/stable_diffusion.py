"""Stable Diffusion: prompt → text embeddings → sampled latents → VAE decode → PIL images.

    pipe = StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    result = pipe("a photograph of an astronaut riding a horse", seed=1)
    result.images[0].save("astronaut.png")

A call is a `GenerationRequest` (`ldm.pipelines.request`; keyword arguments build one) run through named stages:
`plan` (checks against the model, defaults, schedule, generators), `encode` (text → conditioning), `start`
(noise, or a noised image), `sample`, `annotate` (the infotext's parameters) and `finish` (decode, safety
check). Image-to-image (SDEdit) starts from a noised encoding of `image`; inpainting adds a `mask`, fed to a
9-channel UNet as extra channels, or pasted back after every step for a 4-channel one. Loading lives in
`ldm.loading.components` (files → networks); the SDXL base → refiner hand-off in `ldm.pipelines.refiner`.

`pipe.unet`, `pipe.vae`, `pipe.text_encoder` and `pipe.tokenizer` are plain attributes: swap them,
hook them, or call them directly. Each step is reported to `callbacks` as a `Step(i, total, sigma, x,
denoised)`; `ldm.hooks.attention_maps` records cross-attention at the attention dispatch point.
"""

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm.adapters.embeddings import Embedding, folder_embeddings, load_embedding
from ldm.adapters.lora import LoadedLora, find_lora
from ldm.adapters.lora import load_lora as merge_lora
from ldm.adapters.lora import unload_loras as unmerge_loras
from ldm.choices import EMPHASES
from ldm.errors import InputError, LdmError
from ldm.loading.components import Components, load_components, load_single_file_components
from ldm.loading.controlnets import find_controlnet, load_controlnet
from ldm.loading.families import ModelSpec
from ldm.loading.hashes import sha256
from ldm.networks.clip import CLIPTextModel, CLIPVisionModelWithProjection
from ldm.networks.controlnet import ControlNet
from ldm.networks.ip_adapter import IPAdapter
from ldm.networks.safety import Safety
from ldm.networks.tokenizer import CLIPTokenizer
from ldm.networks.unet import UNet, guidance_embedding
from ldm.networks.vae import VAE
from ldm.pipelines.control import Unit, control_image, control_infotext, like_unet, with_controls
from ldm.pipelines.image_prompts import image_prompt_infotext, image_prompting
from ldm.pipelines.images import image_to_tensor, mask_to_tensor, to_pil
from ldm.pipelines.infotext import controlnet_units, infotext
from ldm.pipelines.memory import check_fits, memory_errors
from ldm.pipelines.plan import Generators, Plan, make_plan
from ldm.pipelines.prompts import EmbeddingLookup, empty_chunk, encode_chunks, extract_extra_networks, prompt_chunks
from ldm.pipelines.request import MAX_CLIP_SKIP, MAX_SEED, GenerationRequest  # noqa: F401 (MAX_*: their old home)
from ldm.sampling.denoisers import PredictionDenoiser, guided, with_channels
from ldm.sampling.samplers import Step, StepCallback, asked_steps, randn, sampler_for
from ldm.sampling.schedules import SchedulerConfig
from ldm.speed.accelerate import TensorTimestep
from ldm.speed.offload import execution_device
from ldm.speed.pacing import StepPacing


@dataclass
class Generation:
    images: list[Image.Image]
    seed: int
    infotexts: list[str] = field(default_factory=list)  # AUTOMATIC1111 `parameters`, one per image
    latents: Tensor | None = None  # σ-space, from a run stopped early (denoising_end); output_type="latent": the VAE's
    nsfw: list[bool | None] = field(default_factory=list)  # per image: the safety checker's flag; None: no checker
    notes: list[str] = field(default_factory=list)  # what the user should know (a prompt cut at 77 tokens, …)
    params: dict = field(default_factory=dict)  # the infotext's parameters (before each image's seed and position)
    evaluations: int = 0  # UNet evaluations (with guidance, each runs both branches): Heun takes two a step

    def then(self, second_pass: Callable[[dict], "Generation"], kept: Sequence[str], described: dict) -> "Generation":
        """The result of a run in two passes, this the first's (a hires fix, a base → refiner hand-off):
        `second_pass(describe)` runs the second with infotext parameters that keep this pass's `kept` ones and add
        `described`; the result has both passes' notes (each once) and UNet evaluations."""
        result = second_pass({key: self.params[key] for key in kept} | described)
        result.notes = list(dict.fromkeys(self.notes + result.notes))
        result.evaluations += self.evaluations
        return result


class StableDiffusion:
    """SD 1.x/2.x text-to-image, image-to-image and inpainting on the official diffusers folder layout.

    Every field a pipeline has is declared in `__init__`, those that the loader (`from_components`) and the
    adapters (`ldm.adapters`) fill included; nothing else sets attributes on a pipeline."""

    def __init__(self, spec: ModelSpec, unet: UNet, vae: VAE, text_encoder: CLIPTextModel | None,
                 tokenizer: CLIPTokenizer | None, scheduler: SchedulerConfig, device: torch.device,
                 dtype: torch.dtype, name: str = "model"):
        self.spec = spec  # the model's family (`ldm.loading.families.ModelSpec`), with what its configs state
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler, self.dtype, self.name = scheduler, dtype, name
        self.device = device  # where the networks run (offload hooks bring them there from the CPU)
        self.default_sampler = sampler_for(scheduler)  # None: the folder's scheduler is not one ldm has
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.safety_checker: Safety | None = None  # set: every image is checked, flagged ones come back black
        self.embeddings: dict[str, Embedding] = {}  # textual inversion, by trigger word (`load_embedding`)
        self.notes: list[str] = []  # said once, at load: embeddings of the folder that do not fit, …
        self.model_file: Path | None = None  # a single-file checkpoint: its sha256 is the infotext's Model hash
        self.loras: list[LoadedLora] = []  # merged adapters, in load order (`load_lora`)
        # (component, weight name) → the weight before any LoRA touched it: what `unload_loras` restores
        self.lora_originals: dict[tuple[str, str], Tensor] = {}
        self.vae_name: str | None = None  # another VAE than the model's own (`vae=`): the infotext's VAE
        self.seamless = False  # circular padding (`ldm.adapters.seamless.set_seamless`): the infotext's Tiling
        # the model card's steps, guidance, width and height, where a request gives none and they are not ldm's
        # defaults (50 steps, guidance 7.5, the native size): the manifest's few-step models (SD-Turbo: 1, 0.0)
        self.defaults: dict = {}
        self.controlnets: dict[Path, ControlNet] = {}  # loaded by `controlnet`, kept between calls
        self.ip_adapters: dict[Path, IPAdapter] = {}  # image prompts' adapters and encoders, kept between calls
        self.image_encoders: dict[Path, CLIPVisionModelWithProjection] = {}

    @property
    def default_strength(self) -> float:
        """Image-to-image's strength where the request gives none: the family's (`ModelSpec.default_strength`)."""
        return self.spec.default_strength

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str = "auto", dtype: str = "auto",
                        variant: str | None = None, revision: str | None = None,
                        local_files_only: bool = False, prediction_type: str | None = None,
                        safety_checker: bool = True, vae: str | Path | None = None,
                        unet: str | Path | None = None) -> "StableDiffusion":
        """Load an official diffusers folder (or its Hub id), or an original single-file checkpoint
        (`ldm.loading.components.load_components`); SDXL models come back as `StableDiffusionXL`. `vae`: another
        VAE (a folder or a file) in place of its own."""
        return cls.from_components(load_components(model, device, dtype, variant, revision, local_files_only,
                                                   prediction_type, safety_checker, vae, unet))

    @classmethod
    def from_single_file(cls, path: str | Path, device: str = "auto", dtype: str = "auto",
                         prediction_type: str | None = None, vae: str | Path | None = None,
                         unet: str | Path | None = None) -> "StableDiffusion":
        """Load an original single-file checkpoint (`ldm.loading.components.load_single_file_components`)."""
        return cls.from_components(load_single_file_components(path, device, dtype, prediction_type, vae, unet))

    @staticmethod
    def from_components(parts: Components) -> "StableDiffusion":
        """The pipeline over loaded networks (a `StableDiffusionXL` for an SDXL family), with the embeddings of
        weights/embeddings that fit it."""
        common = (parts.spec, parts.unet, parts.vae, parts.encoders.get("text_encoder"),
                  parts.tokenizers.get("text_encoder"), parts.scheduler, parts.device, parts.dtype, parts.name)
        if not parts.spec.xl:
            pipe = StableDiffusion(*common)
        else:
            pipe = StableDiffusionXL(*common, parts.encoders["text_encoder_2"], parts.tokenizers["text_encoder_2"])
        pipe.safety_checker, pipe.vae_name, pipe.model_file = parts.safety, parts.vae_name, parts.model_file
        pipe.defaults = dict(parts.card)
        found, pipe.notes = folder_embeddings(pipe.tower_widths())
        pipe.embeddings = {e.name: e for e in found}
        return pipe

    # --------------------------------------------------------------------------------- prompts

    def text_towers(self, clip_skip: int = 1) -> list[tuple[str, CLIPTokenizer, CLIPTextModel, int, bool]]:
        """(component, tokenizer, encoder, hidden layer, final LayerNorm) of each text tower of the family, in
        the order their hidden states are concatenated (the pooled embedding is the last tower's). The layer
        is the family's rule (`ModelSpec.text_layer`): SD 1.x/2.x read the last layer through the final
        LayerNorm, clip skip N layer -N instead (A1111's meaning; SD 2.x folders already dropped OpenCLIP's
        last layer, so N counts from the penultimate there); SDXL reads each tower's penultimate hidden state
        without the final LayerNorm, clip skip N layer -(N+1) (diffusers' `clip_skip=N-1`)."""
        return [self._tower(tower.component, getattr(self, tower.tokenizer), getattr(self, tower.component),
                            clip_skip) for tower in self.spec.towers]

    def _tower(self, name: str, tokenizer, encoder, clip_skip: int):
        layer, final_norm = self.spec.text_layer(clip_skip)
        depth = encoder.config.num_hidden_layers
        if -layer > depth:
            raise InputError(f"clip skip {clip_skip} is more than the {depth} layers of {self.name}'s {name}")
        return name, tokenizer, encoder, layer, final_norm

    def load_lora(self, path: str | Path, weight: float = 1.0) -> LoadedLora:
        """Merge a LoRA/LyCORIS file (a path, or a name in weights/loras) into the UNet and text towers
        (`ldm.adapters.lora`): it applies to every later call, at no cost per step, until `unload_loras()`."""
        return merge_lora(self, find_lora(str(path)), weight)

    def unload_loras(self) -> None:
        """Restore every weight a LoRA touched, bit for bit."""
        unmerge_loras(self)

    def identity(self) -> dict:
        """The infotext's description of the loaded model: Model hash (single files), Model, VAE (another one),
        Tiling (seamless), Lora hashes."""
        return {"Model hash": sha256(self.model_file)[:10] if self.model_file else None, "Model": self.name,
                "VAE": self.vae_name, "Tiling": True if self.seamless else None,
                "Lora hashes": ", ".join(f"{lora.name}: {lora.hash}" for lora in self.loras) or None}

    def tower_widths(self) -> dict[str, int]:
        return {name: enc.config.hidden_size for name, _, enc, _, _ in self.text_towers()}

    def load_embedding(self, path: str | Path) -> Embedding:
        """Add a textual-inversion embedding (`ldm.adapters.embeddings`); its trigger word is the file's stem."""
        embedding = load_embedding(path, self.tower_widths())
        self.embeddings[embedding.name] = embedding
        return embedding

    def chunk_count(self, text: str, prompt_syntax: str = "a1111") -> int:
        """How many chunks of 75 tokens `text` takes (the prompts of one batch are padded to the most)."""
        name, tokenizer = self.text_towers()[0][:2]
        return len(prompt_chunks(tokenizer, text, prompt_syntax, "original", self._lookup(name, tokenizer))[0])

    def _lookup(self, tower: str, tokenizer: CLIPTokenizer) -> EmbeddingLookup:
        return EmbeddingLookup(tokenizer, {n: e.vectors[tower] for n, e in self.embeddings.items()})

    @torch.no_grad()
    def encode_text(self, groups: list[list[str]], prompt_syntax: str = "a1111", emphasis: str = "original",
                    clip_skip: int = 1, notes: list[str] | None = None,
                    used: set[str] | None = None) -> list[tuple[Tensor, Tensor]]:
        """Each group of texts (the prompts; the negatives) → (hidden (texts, 77·k, width), pooled (texts,
        width)), every text padded with empty chunks to the same number of chunks k (`ldm.pipelines.prompts`). The
        towers' hidden states are concatenated along the width; the pooled embedding is the last tower's.
        `notes` receives what the plain syntax cut off; `used` the embeddings the texts name."""
        towers = self.text_towers(clip_skip)
        chunked = []  # [tower][group][text] → chunks
        for name, tokenizer, _, _, _ in towers:
            lookup = self._lookup(name, tokenizer)
            per_group = []
            for texts in groups:
                rows = []
                for text in texts:
                    chunks, dropped = prompt_chunks(tokenizer, text, prompt_syntax, emphasis, lookup)
                    if dropped and notes is not None and name == towers[0][0]:
                        notes.append(f"the prompt {text[:30]!r}… was cut at 77 tokens, as diffusers cuts it (plain "
                                     f"syntax; A1111's reads it all): dropped {dropped!r}")
                    rows.append(chunks)
                per_group.append(rows)
            chunked.append(per_group)
            if used is not None:
                used |= lookup.used
        k = max(len(chunks) for tower in chunked for rows in tower for chunks in rows)
        encoded = []
        for g in range(len(groups)):
            hidden, pooled = [], None
            for (_, tokenizer, encoder, layer, final_norm), tower in zip(towers, chunked, strict=True):
                rows = [chunks + [empty_chunk(tokenizer)] * (k - len(chunks)) for chunks in tower[g]]
                out = encode_chunks(encoder, rows, layer, final_norm, emphasis)
                hidden.append(out.hidden)
                pooled = out.pooled
            encoded.append((torch.cat(hidden, dim=-1), pooled))
        return encoded

    def conditioning(self, prompts: list[str], negatives: list[str] | None, num_images: int, guide: bool,
                     size: tuple[int, int], micro: dict, **text) -> tuple[dict, dict | None]:
        """The UNet's conditioning keyword arguments for the prompts and, with guidance, the negatives
        (None: no negative prompt given; SD encodes the empty prompt then, as diffusers does). `text`: the
        keyword arguments of `encode_text`."""
        if micro:
            raise InputError(f"{', '.join(micro)}: SDXL micro-conditioning, and {self.name} is not an SDXL model")
        groups = [prompts] + ([negatives or [""] * len(prompts)] if guide else [])
        encoded = [hidden.repeat_interleave(num_images, dim=0) for hidden, _ in self.encode_text(groups, **text)]
        return {"context": encoded[0]}, ({"context": encoded[1]} if guide else None)

    def __call__(self, request: GenerationRequest | str | list[str], negative_prompt: str | list[str] | None = None,
                 *, callbacks: Sequence[StepCallback] = (), generator: Generators | None = None,
                 describe: dict | None = None, **options) -> Generation:
        """Run a `GenerationRequest`, or build one from a prompt and keyword arguments (its fields).

        Text-to-image by default; image-to-image (SDEdit) with `image` (one image, one per image of the batch, or
        VAE latents, as diffusers takes them); inpainting with `image` and `mask` (white = repaint).
        `output_type="latent"` returns the VAE latents undecoded (`Generation.latents`). `hires_scale` (with
        `hires_steps`, `hires_denoise`, `hires_upscaler`) runs A1111's hires fix (`ldm.pipelines.hires`).

        Defaults: the model's native size (the image's, rounded down to a multiple of 8, when there is one), its
        folder's sampler, 50 steps, guidance 7.5, strength 0.8 (0.3 for SDXL, 1.0 with a mask), a random seed
        (returned in the result).

        SDXL only: `original_size`, `crop_coords`, `target_size` as (height, width) / (top, left) pairs,
        the refiner's `aesthetic_score` / `negative_aesthetic_score`. Base → refiner hand-off (`BaseWithRefiner`
        does it for you): `denoising_end=f` stops after the first fraction f of the schedule and returns σ-space
        `latents` (no images); `latents=…, denoising_start=f` finishes them (diffusers' rule for the cut).

        Prompts are read as AUTOMATIC1111 reads them (`ldm.pipelines.prompts`): `(word:1.3)` emphasis, any length in
        chunks of 75 tokens, `BREAK`, textual-inversion trigger words (`load_embedding`, weights/embeddings);
        `prompt_syntax="plain"` reads them literally and truncates at 77 tokens as diffusers does. `emphasis`:
        "original" (A1111's default), "no-norm" or "none". `clip_skip` N > 1 conditions on the text tower's
        N-th layer from the end (A1111's meaning for SD 1.x).

        LoRA/LyCORIS adapters: those merged with `load_lora` apply to every call; `<lora:NAME:WEIGHT>` in a
        prompt (A1111's syntax; NAME a file in weights/loras) and `loras=[(NAME, WEIGHT), …]` are merged for this
        call only (the tags stay in the infotext's prompt and are left out of the text encoded;
        `prompt_loras=False` ignores them, as a refiner does that finishes a base's run).

        `callbacks`: each is called with a `Step(i, total, sigma, x, denoised)` after every step (i counts the
        steps asked for: PNDM's doubled step is one step, reported once; `Generation.evaluations` counts UNet
        calls) and may return replacement σ-space latents; one with a `begin(total)` method is told the step
        count first (a progress bar shows at once). `generator` replaces the one(s) seeded from `seed`.
        Text-to-image also takes one seed per prompt or per image (`seed=[…]`): each prompt's (each image's)
        images then come out as they would from a call of their own with that seed, while the batch runs through
        the networks together, and each PNG records its own seed.
        """
        if isinstance(request, GenerationRequest):
            if negative_prompt is not None or options:
                raise TypeError("pass a GenerationRequest alone, or a prompt and keyword arguments")
        else:
            request = GenerationRequest(request, negative_prompt, **options)
        with self.call_loras(request):  # (both passes of a hires fix run with them)
            if request.hires_scale is not None:
                from ldm.pipelines.hires import hires_fix

                return hires_fix(self, request, callbacks, generator, describe)
            return self.generate(request, callbacks, generator, describe)

    @contextmanager
    def call_loras(self, request: GenerationRequest):
        """Merge the request's LoRAs (`loras`, and `<lora:NAME:W>` tags in its prompts) for the duration; back to
        the LoRAs merged before, bit for bit, after."""
        tagged: dict[str, float] = {}  # the prompts' tags, each LoRA once (a batch of prompts shares them)
        for text in request.prompts if request.prompt_loras else []:
            for name, args in extract_extra_networks(text)[1]:
                try:
                    weight = float(args[0]) if args else 1.0
                except ValueError:
                    raise InputError(f"<lora:{name}:{':'.join(args)}>: the weight must be a number",
                                     field="prompt") from None
                if tagged.setdefault(name, weight) != weight:
                    raise InputError(f"the prompts of one call ask for LoRA {name!r} at {tagged[name]} and {weight}",
                                     field="prompt")
        wanted = list(request.loras) + list(tagged.items())
        if not wanted:
            yield
            return
        kept = [(lora.path, lora.weight) for lora in self.loras]
        try:
            for name, weight in wanted:  # names in the LoRA folder only: prompts and requests may not name paths
                merge_lora(self, find_lora(name, allow_paths=False), weight)
            yield
        finally:
            unmerge_loras(self)
            for path, weight in kept:
                merge_lora(self, path, weight)

    @torch.no_grad()
    @memory_errors
    def generate(self, request: GenerationRequest, callbacks: Sequence[StepCallback] = (),
                 generator: Generators | None = None, describe: dict | None = None) -> Generation:
        """The algorithm: plan, encode the text, start from noise (or an image), sample, annotate, decode.
        `describe`: infotext keys that replace or extend the run's own (a refiner names its base)."""
        plan = self.plan(request, generator)
        notes, used = [], set()
        cond, uncond = self.encode(plan, notes, used)
        with image_prompting(self, plan, guided=uncond is not None):  # (IP-Adapter: its attention for the call)
            unet, x, paste = self.start(plan)
            x, evaluations = self.sample(plan, unet, x, cond, uncond, paste, callbacks)
        params = self.annotate(plan, used) | (describe or {})
        if plan.request.denoising_end is not None:  # the base's part of a hand-off: latents, no images
            return Generation([], plan.seed, [], latents=x, notes=notes, params=params, evaluations=evaluations)
        if plan.request.output_type == "latent":  # the VAE's latents, undecoded
            return Generation([], plan.seed, [], latents=plan.schedule.to_latents(x), notes=notes, params=params,
                              evaluations=evaluations)
        images, nsfw = self.finish(plan, x)
        texts = [infotext(prompt, negative, params | extra) for prompt, negative, extra in self.captions(plan)]
        return Generation(images, plan.seed, texts, nsfw=nsfw, notes=notes, params=params, evaluations=evaluations)

    def plan(self, request: GenerationRequest, generator: Generators | None = None) -> Plan:
        """Check the request against this model, fill in its defaults, and lay out the schedule and the random
        generators (`ldm.pipelines.plan.make_plan`: the family's spec, the scheduler config, the VAE's scale)."""
        return check_fits(self, make_plan(self.spec, request, self.scheduler, self.vae_scale, self.name, generator,
                                          self.defaults))

    def encode(self, plan: "Plan", notes: list[str], used: set[str]) -> tuple[dict, dict | None]:
        """The UNet's conditioning for the prompts and, with guidance (a scale above 1, diffusers' rule), the
        negatives; an LCM UNet's (`time_cond_proj_dim`) instead takes the guidance weight w = scale − 1 embedded, and
        no negatives, as StableDiffusion(XL)Pipeline and LatentConsistencyModelPipeline give it. `notes` receives what
        a plain prompt lost at 77 tokens; `used` the embeddings named."""
        r = plan.request
        micro = {k: getattr(r, k) for k in ("original_size", "crop_coords", "target_size", "aesthetic_score",
                                            "negative_aesthetic_score") if getattr(r, k) is not None}
        embedded = self.embeds_guidance  # an LCM UNet: the guidance is its input, not a second batch
        if embedded and r.negative_prompt is not None:
            notes.append(f"the negative prompt is not used: {self.name}'s UNet takes the guidance scale as an input "
                         "(an LCM UNet) and runs no unconditional pass")
        cond, uncond = self.conditioning(r.prompts, r.negatives, r.num_images, r.guidance > 1 and not embedded,
                                         (r.height, r.width), micro, prompt_syntax=r.prompt_syntax,
                                         emphasis=r.emphasis, clip_skip=r.clip_skip, notes=notes, used=used)
        if embedded:
            w = torch.full((r.batch,), r.guidance - 1.0)
            width = self.unet.config.time_cond_proj_dim
            cond["timestep_cond"] = guidance_embedding(w, width).to(self.device, self.dtype)
        return cond, uncond

    def sample(self, plan: "Plan", unet, x: Tensor, cond: dict, uncond: dict | None, paste,
               callbacks: Sequence[StepCallback]) -> tuple[Tensor, int]:
        """Run the sampler over the schedule: (the σ-space result, the UNet evaluations it took)."""
        r, schedule = plan.request, plan.schedule
        if r.controls:
            units = [Unit(c, self.controlnet(c.model), control_image(c, r.width, r.height, seed=plan.seed))
                     for c in r.controls]
            unet = with_controls(unet, units, plan.unet_calls, guided=uncond is not None)
        denoiser = PredictionDenoiser(guided(unet, cond, uncond, r.guidance, r.guidance_rescale), schedule,
                                      self.scheduler.prediction_type, self.dtype)
        evaluations = 0

        def counted(x: Tensor, sigma: float) -> Tensor:
            nonlocal evaluations
            evaluations += 1
            return denoiser(x, sigma)

        for callback in callbacks:
            if hasattr(callback, "begin"):
                callback.begin(asked_steps(schedule.sigmas))

        pacing = StepPacing(self.device)

        def step_end(step: Step) -> Tensor | None:
            """The paste after every sampler step; the callbacks once per step asked for (`Step.repeat`), the host
            kept two steps ahead of the device for them (`StepPacing`)."""
            replaced = None if paste is None else paste(step)
            if callbacks:
                pacing.step()
            if step.repeat:
                return replaced
            step = dataclasses.replace(step, i=step.asked, total=step.asked_total,
                                       x=step.x if replaced is None else replaced)
            for callback in callbacks:
                out = callback(step)
                if out is not None:
                    replaced = out
                    step = dataclasses.replace(step, x=out)
            return replaced

        x = plan.spec.sample(counted, x, schedule, step_end if paste or callbacks else None, eta=r.eta,
                             generator=plan.generator, output=self.scheduler.prediction_type)
        return x, evaluations

    def annotate(self, plan: "Plan", used: set[str]) -> dict:
        """The infotext's parameters: A1111's keys, in A1111's order (each image adds its own seed and position)."""
        r = plan.request
        eta_key = "Eta DDIM" if r.sampler == "ddim" else "Eta"  # A1111's keys: `Eta` is its ancestral samplers' η
        params = {"Steps": r.steps, "Sampler": plan.spec.label, "Schedule type": "Karras" if plan.karras else None,
                  "CFG scale": r.guidance, "Seed": plan.seed, "Size": f"{r.width}x{r.height}", "Model hash": None,
                  "Model": None, "VAE": None, "Denoising strength": r.strength if r.image is not None else None,
                  "Clip skip": r.clip_skip if r.clip_skip > 1 else None, "Tiling": None,
                  eta_key: r.eta if "eta" in plan.spec.options and r.eta not in (None, plan.spec.eta) else None,
                  "Timestep spacing": r.timestep_spacing,
                  "CFG rescale": r.guidance_rescale or None,
                  "Lora hashes": None,
                  "TI hashes": ", ".join(f"{n}: {self.embeddings[n].hash}" for n in sorted(used)) or None,
                  "Emphasis": EMPHASES[r.emphasis] if r.emphasis != "original" else None,
                  "Prompt syntax": r.prompt_syntax if r.prompt_syntax != "a1111" else None}
        params |= controlnet_units([(c, control_infotext(c)) for c in r.controls]
                                   + [(p, image_prompt_infotext(self, p)) for p in r.image_prompts])
        return params | self.identity()  # (the keys above hold A1111's order)

    def finish(self, plan: "Plan", x: Tensor) -> tuple[list[Image.Image], list[bool | None]]:
        """Decode the σ-space result; the safety checker's verdicts (None: no checker), flagged images black."""
        images = self.decode(plan.schedule.to_latents(x))
        if self.safety_checker is not None:
            return self.safety_checker(images)
        return images, [None] * len(images)

    @staticmethod
    def captions(plan: "Plan"):
        """Per image: its prompt, negative prompt and the infotext keys of its own (seed, batch position)."""
        r = plan.request
        seeds = r.seed if isinstance(r.seed, list) else None
        per_image = seeds is not None and len(seeds) == r.batch
        for i in range(r.batch):
            extra = {"Batch size": r.batch, "Batch pos": i} if r.batch > 1 else {}
            own_seed = {"Seed": seeds[i if per_image else i // r.num_images]} if seeds else {}
            negatives = r.negatives
            yield r.prompts[i // r.num_images], negatives[i // r.num_images] if negatives else "", own_seed | extra

    @property
    def native_size(self) -> int:
        """The side in pixels the model draws at by default: its UNet's sample size × the VAE's scale."""
        return self.spec.sample_size * self.vae_scale

    def controlnet(self, model) -> ControlNet:
        """A ControlNet for this model by path or by name in weights/controlnet/ (`ldm.loading.controlnets`), loaded
        once on the model's device and dtype and kept; a loaded `ControlNet` as it is; either given what accelerate
        and offload did to the UNet (`like_unet`)."""
        if isinstance(model, ControlNet):
            return like_unet(model, self.networks()["unet"])
        path = find_controlnet(model).resolve()
        if path not in self.controlnets:
            unet = self.networks()["unet"].config
            self.controlnets[path] = load_controlnet(path, unet, self.spec, self.device, self.dtype)
        return like_unet(self.controlnets[path], self.networks()["unet"])

    @property
    def embeds_guidance(self) -> bool:
        """An LCM UNet (`time_cond_proj_dim`): the guidance scale is its input, and no unconditional pass runs."""
        return self.unet.config.time_cond_proj_dim is not None

    @property
    def inpainting(self) -> bool:
        """A UNet that takes mask and masked-image latents besides the noisy latents (9 channels)."""
        return self.spec.inpainting

    def encode_image(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """Scaled float32 latents of an image in [-1, 1]: a sample of the VAE posterior, noise from
        `generator`. An SDXL VAE whose config says force_upcast encodes in fp32 whatever the dtype (bf16 too), as
        StableDiffusionXLImg2ImgPipeline.prepare_latents does (its decode upcasts for fp16 only)."""
        vae_dtype = next(self.vae.parameters()).dtype
        upcast = self.spec.upcast_vae and vae_dtype != torch.float32 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            self.vae.to(torch.float32)  # (and back: bf16 and fp16 weights are exact in fp32)
        try:
            mean, logvar = self.vae.encode(image.to(self.device, torch.float32 if upcast else vae_dtype))
            latents = self.vae.sample(mean, logvar, generator) * self.vae.config.scaling_factor
        finally:
            if upcast:
                self.vae.to(vae_dtype)
        return latents.float()

    def start(self, plan: "Plan"):
        """The UNet to call (with the inpainting channels where the UNet takes them), the initial σ-space latents
        (float32) and, inpainting with a 4-channel UNet, the paste of the known region after each step.

        Random draws come in diffusers' order: text-to-image: noise. Image-to-image: the image's latent
        sample (none for latents given as the image), then noise. Inpainting: the image's latent sample (4-channel
        UNet, or strength < 1), noise, then the masked image's latent sample. A hand-off's second half starts from
        its latents.
        """
        r, schedule, generator, shape = plan.request, plan.schedule, plan.generator, plan.shape
        if r.latents is not None:
            return self.unet, r.latents.to(self.device, torch.float32), None
        batch, _, h, w = shape

        def noise() -> Tensor:
            return randn(shape, generator).to(self.device)

        if r.image is None:
            return self.unet, noise() * schedule.init_noise_sigma, None
        if r.mask is None:  # image-to-image: the init latents noised to the first σ kept
            return self.unet, self.init_latents(r.image, shape, generator) + noise() * schedule.sigmas[0], None
        pixels = image_to_tensor(r.image, w * self.vae_scale, h * self.vae_scale)

        repaint = mask_to_tensor(r.mask, w * self.vae_scale, h * self.vae_scale)
        init = None
        if not self.inpainting or r.strength < 1:
            init = self.encode_image(pixels, generator).repeat(batch, 1, 1, 1)
        eps = noise()
        x = eps * schedule.init_noise_sigma if r.strength == 1 else init + eps * schedule.sigmas[0]
        latent_mask = F.interpolate(repaint, size=(h, w)).to(self.device)
        if self.inpainting:
            masked = self.encode_image(pixels * (repaint < 0.5), generator)
            return with_channels(self.unet, torch.cat([latent_mask, masked], dim=1)), x, None

        # A 4-channel UNet. diffusers encodes the masked image here too (unused): draw what its latent
        # sample draws, so that later random draws (ancestral samplers) stay in step.
        torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)
        sigmas = schedule.sigmas

        def paste_known(step: Step) -> Tensor:
            """After every step, paste the known region back noised to the new σ with the starting noise;
            after the last step, clean (scaled so that it is clean once `to_latents` has run)."""
            sigma = sigmas[step.i + 1]
            known = init * (1 + sigma**2) ** 0.5 if step.i + 2 == len(sigmas) else init + eps * sigma
            return (1 - latent_mask) * known + latent_mask * step.x

        return self.unet, x, paste_known

    def init_latents(self, image: "Image.Image | list[Image.Image] | Tensor", shape: tuple, generator) -> Tensor:
        """Image-to-image's clean latents for the batch: latents given as the image as they are, or the images
        encoded: one posterior sample of the batch, or with a list of generators one of each group of images, in
        the groups `randn` draws (a generator per image: one sample each, as diffusers does)."""
        batch, _, h, w = shape
        if isinstance(image, Tensor):
            init = image.to(self.device, torch.float32)
        else:
            images = image if isinstance(image, list) else [image]
            pixels = torch.cat([image_to_tensor(i, w * self.vae_scale, h * self.vae_scale) for i in images])
            if isinstance(generator, list):
                groups = pixels.repeat(batch // len(images), 1, 1, 1).chunk(len(generator))
                init = torch.cat([self.encode_image(p, g) for p, g in zip(groups, generator, strict=True)])
            else:
                init = self.encode_image(pixels, generator)
        return init.repeat(batch // init.shape[0], 1, 1, 1)

    @torch.no_grad()
    def decode(self, latents: Tensor, vae: torch.nn.Module | None = None) -> list[Image.Image]:
        """The images of (scaled) latents, decoded by the pipeline's VAE or by `vae` (a TAESD for previews)."""
        vae = vae or self.vae
        weight = next(vae.parameters())
        images = vae.decode(latents.to(execution_device(vae), weight.dtype) / vae.config.scaling_factor)
        if not torch.isfinite(images).all():
            raise LdmError(f"the VAE decode produced NaN/inf values ({weight.dtype} overflow): run again with "
                           "--dtype fp32, or bf16 where the device supports it")
        return to_pil(images)

    def to(self, device: torch.device | str) -> "StableDiffusion":
        """Move every network (`networks()`) to `device` (to park an idle model on the CPU, say)."""
        networks = self.networks()
        for network in networks.values():
            network.to(device)
        if self.unet is not networks["unet"]:  # a speed wrapper moves too: it drops the CUDA graphs it captured
            self.unet.to(device)
        for extra in [*self.controlnets.values(), *self.ip_adapters.values(), *self.image_encoders.values()]:
            extra.to(device)
        self.device = torch.device(device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        """The text towers, the UNet and the VAE: `networks()` without the safety checker."""
        return [network for name, network in self.networks().items() if name != "safety_checker"]

    def networks(self) -> dict[str, torch.nn.Module]:
        """The networks as loaded, by component name: the family's text towers, the UNet (without a speed wrapper
        around it), the VAE and the safety checker's, if any. What `to`, adapters and offload walk."""
        found = {tower.component: getattr(self, tower.component) for tower in self.spec.towers}
        found |= {"unet": self.unet.unet if isinstance(self.unet, TensorTimestep) else self.unet, "vae": self.vae,
                  "safety_checker": self.safety_checker.checker if self.safety_checker is not None else None}
        return {name: network for name, network in found.items() if network is not None}


class StableDiffusionXL(StableDiffusion):
    """SDXL base 1.0 and refiner 1.0: two text towers (the refiner has only OpenCLIP-bigG), penultimate
    hidden states, the pooled bigG embedding and size (or aesthetic-score) micro-conditioning."""

    def __init__(self, spec: ModelSpec, unet: UNet, vae: VAE, text_encoder: CLIPTextModel | None,
                 tokenizer: CLIPTokenizer | None, scheduler: SchedulerConfig, device: torch.device,
                 dtype: torch.dtype, name: str, text_encoder_2: CLIPTextModel, tokenizer_2: CLIPTokenizer):
        super().__init__(spec, unet, vae, text_encoder, tokenizer, scheduler, device, dtype, name)
        self.text_encoder_2 = text_encoder_2  # OpenCLIP-bigG (the refiner's only tower): the pooled embedding's
        self.tokenizer_2 = tokenizer_2

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """No negative prompt: zeros as the unconditional embeddings (the family's, or model_index.json's, choice)."""
        return self.spec.force_zeros_for_empty_prompt

    @property
    def requires_aesthetics_score(self) -> bool:
        """The refiner's micro-conditioning: an aesthetic score in place of the target size (`ModelSpec`)."""
        return self.spec.requires_aesthetics_score

    def conditioning(self, prompts: list[str], negatives: list[str] | None, num_images: int, guide: bool,
                     size: tuple[int, int], micro: dict, **text) -> tuple[dict, dict | None]:
        """context, text_embeds and time_ids. time_ids: original size, crop top-left, then the target size
        (base) or the aesthetic score (refiner); sizes as (height, width), defaulting to the output size."""
        unknown = {"aesthetic_score", "negative_aesthetic_score"} if not self.requires_aesthetics_score \
            else {"target_size"}
        if unknown & set(micro):
            kind = "refiner" if self.requires_aesthetics_score else "base"
            raise InputError(f"{', '.join(sorted(unknown & set(micro)))} does not apply to an SDXL {kind} model")
        original, crop = micro.get("original_size", size), micro.get("crop_coords", (0, 0))
        if self.requires_aesthetics_score:
            ids = [(*original, *crop, micro.get("aesthetic_score", 6.0)),
                   (*original, *crop, micro.get("negative_aesthetic_score", 2.5))]
        else:
            ids = [(*original, *crop, *micro.get("target_size", size))] * 2
        batch = len(prompts) * num_images

        def time_ids(values: tuple) -> Tensor:
            return torch.tensor([values] * batch, dtype=self.dtype, device=self.device)

        zeros = negatives is None and self.force_zeros_for_empty_prompt  # the folder's choice for no negative
        groups = [prompts] + ([negatives or [""] * len(prompts)] if guide and not zeros else [])
        embeds = [{"context": context.repeat_interleave(num_images, dim=0),
                   "text_embeds": pooled.repeat_interleave(num_images, dim=0)}
                  for context, pooled in self.encode_text(groups, **text)]
        cond = embeds[0] | {"time_ids": time_ids(ids[0])}
        if not guide:
            return cond, None
        uncond = {k: torch.zeros_like(v) for k, v in embeds[0].items()} if zeros else embeds[1]
        return cond, uncond | {"time_ids": time_ids(ids[1])}
