"""Image prompts (IP-Adapter) in a run: the reference images encoded once per call into each adapter's tokens, and
the UNet's cross-attentions given them for the call (`ldm.adapters.ip_adapter`).

Reproduces diffusers' StableDiffusion(XL)Pipeline after `load_ip_adapter` + `set_ip_adapter_scale`
(src/diffusers/loaders/ip_adapter.py; the pipelines' `encode_image` and `prepare_ip_adapter_image_embeds`, v0.42):
each reference image preprocessed as `CLIPImageProcessor(size=image_size, crop_size=image_size)` (the short side
resized to the encoder's image_size, bicubic, centre crop, CLIP's mean and std: `ldm.networks.safety.preprocess`,
which computes what transformers 5's CLIPImageProcessor does) and encoded; a plain adapter reads the image
embedding and takes zeros as the negative one, full and plus adapters read the penultimate hidden states and take
the encoder's hidden states of an all-zero pixel tensor as the negative ones. The tokens are the adapter's
projection of these, repeated over the batch ([negative; positive] with guidance, as the UNet's batch).

Several reference images of one prompt: their encodings are averaged before the projection (ComfyUI_IPAdapter_plus's
"average" way of combining them; diffusers instead concatenates the images' tokens). Start and end are fractions of
the UNet calls, the rule ControlNet units follow (diffusers has no start/end for IP-Adapter; sd-webui-controlnet's
IP-Adapter units take ControlNet's guidance start/end). Adapters and encoders are loaded once per pipeline and kept
(`StableDiffusion.ip_adapters`, `.image_encoders`).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ldm.adapters.ip_adapter import ImageTokens, attention_widths, decoupled_attention
from ldm.loading.ip_adapters import (
    check_encoder,
    find_image_encoder,
    find_ip_adapter,
    image_encoder_config,
    load_image_encoder,
    load_ip_adapter,
)
from ldm.networks.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from ldm.networks.ip_adapter import IPAdapter
from ldm.networks.safety import FeatureExtractorConfig, preprocess
from ldm.pipelines.request import ImagePrompt
from ldm.speed.accelerate import TensorTimestep
from ldm.speed.offload import offload_beside, offload_of, offload_with


def load_device(pipe, unet) -> torch.device:
    """Where an adapter or an encoder is loaded: the pipeline's device, or with `unet` offloaded the offload device
    (from where the offload brings it; a ViT-H/14 encoder, 632M parameters, never sits on a small GPU for good)."""
    offload = offload_of(unet)
    return offload.offload_device if offload is not None else pipe.device


def ip_adapter(pipe, model) -> IPAdapter:
    """The adapter by path or by name in weights/ipadapter/, loaded once for this pipeline's UNet and kept (a loaded
    `IPAdapter` as it is); with the UNet offloaded, offloaded with it (`ldm.speed.offload.offload_with`, as a
    ControlNet: its pairs run inside the UNet), in either mode."""
    unet = pipe.networks()["unet"]
    if isinstance(model, IPAdapter):
        adapter = model
    else:
        path = find_ip_adapter(model).resolve()
        if path not in pipe.ip_adapters:
            pipe.ip_adapters[path] = load_ip_adapter(path, attention_widths(unet), unet.config.cross_attention_dim,
                                                     pipe.name, load_device(pipe, unet), pipe.dtype)
        adapter = pipe.ip_adapters[path]
    offload_with(unet, adapter, label="ip_adapter")
    return adapter


def image_encoder(pipe, name, adapter: IPAdapter, adapter_name: str) -> CLIPVisionModelWithProjection:
    """The encoder `name` (a folder, or a name in weights/clip_vision/; None: the first there that fits the adapter),
    loaded once and kept, checked against the adapter's width; with the UNet offloaded, offloaded as a network of its
    own (`ldm.speed.offload.offload_beside`: in model mode on the execution device for its call only)."""
    unet = pipe.networks()["unet"]
    if isinstance(name, CLIPVisionModelWithProjection):
        encoder, name = name, "(given)"
    else:
        path = find_image_encoder(name, adapter.config).resolve()
        if path not in pipe.image_encoders:
            pipe.image_encoders[path] = load_image_encoder(path, load_device(pipe, unet), pipe.dtype)
        encoder, name = pipe.image_encoders[path], path.name
    check_encoder(encoder.config, name, adapter, adapter_name)
    offload_beside(unet, encoder, label="image_encoder")
    return encoder


def encoder_pixels(images: list[Image.Image], image_size: int) -> Tensor:
    """CLIPImageProcessor(size=image_size, crop_size=image_size)'s pixel values, (N, 3, image_size, image_size)."""
    return preprocess(images, FeatureExtractorConfig(image_size, (image_size, image_size)))


@torch.no_grad()
def encode_references(encoder: CLIPVisionModelWithProjection, adapter: IPAdapter,
                      images: list[Image.Image]) -> tuple[Tensor, Tensor]:
    """(positive, negative) features the adapter reads, (1, …) each: the images' averaged, and the negative's."""
    weight = encoder.visual_projection.weight
    pixels = encoder_pixels(images, encoder.config.image_size).to(weight.device, weight.dtype)
    if not adapter.config.reads_hidden_states:
        embeds = encoder(pixels).image_embeds.mean(0, keepdim=True)
        return embeds, torch.zeros_like(embeds)
    positive = encoder(pixels).hidden_states[-2].mean(0, keepdim=True)
    return positive, encoder(torch.zeros_like(pixels[:1])).hidden_states[-2]


def prepare_image_prompt(pipe, prompt: ImagePrompt, batch: int, guided: bool, calls: int) -> ImageTokens:
    """One image prompt's tokens for a UNet batch of `batch` images (twice that with guidance)."""
    adapter = ip_adapter(pipe, prompt.adapter)
    encoder = image_encoder(pipe, prompt.encoder, adapter, adapter_name(prompt))
    positive, negative = encode_references(encoder, adapter, prompt.references)
    with torch.no_grad():
        tokens = adapter(positive).repeat(batch, 1, 1)
        if guided:
            tokens = torch.cat([adapter(negative).repeat(batch, 1, 1), tokens])
    return ImageTokens(adapter, tokens, prompt.weight, prompt.start, prompt.end, calls)


def check_left_out(pipe, prompt: ImagePrompt) -> None:
    """A prompt of weight 0, left out of the run, checked before it as the infotext will name it: its adapter
    loaded for this UNet (and kept), its encoder found and of the width the adapter reads (its config: no weights
    are read for it)."""
    adapter = ip_adapter(pipe, prompt.adapter)
    check_encoder(*encoder_config(prompt, adapter), adapter, adapter_name(prompt))


@contextmanager
def image_prompting(pipe, plan, guided: bool) -> Iterator[None]:
    """The run's image prompts applied to the pipeline's UNet inside the block (none, or all of weight 0: nothing
    changes). The pipeline's UNet runs them as it is, its CUDA graphs included (`decoupled_attention` hands the
    call's state over as tensor arguments), except compiled code, which would not see the swapped attentions: the
    eager UNet runs a call with image prompts then."""
    r = plan.request
    kept = [p for p in r.image_prompts if p.weight != 0]
    for prompt in r.image_prompts:
        if prompt.weight == 0:
            check_left_out(pipe, prompt)
    if not kept:
        yield
        return
    unet = pipe.networks()["unet"]
    prompts = [prepare_image_prompt(pipe, p, r.batch, guided, plan.unet_calls) for p in kept]
    wrapper = pipe.unet
    if isinstance(wrapper, TensorTimestep) and wrapper.compiled:
        pipe.unet = unet
    try:
        with decoupled_attention(unet, prompts, caller=pipe.unet):
            yield
    finally:
        pipe.unet = wrapper


def adapter_name(prompt: ImagePrompt) -> str:
    return Path(str(prompt.adapter)).stem if not isinstance(prompt.adapter, IPAdapter) else "IP-Adapter"


def encoder_config(prompt: ImagePrompt, adapter: IPAdapter) -> tuple[CLIPVisionConfig, str]:
    """A prompt's image encoder's config and name: a loaded one's, else its folder's config.json (no weights read)."""
    if isinstance(prompt.encoder, CLIPVisionModelWithProjection):
        return prompt.encoder.config, "(given)"
    folder = find_image_encoder(prompt.encoder, adapter.config)
    return image_encoder_config(folder), folder.name


def image_prompt_infotext(pipe, prompt: ImagePrompt) -> str:
    """A prompt's infotext value, as sd-webui-controlnet (`infotext.py` `serialize_unit`) writes an IP-Adapter unit,
    one of its ControlNet units (`ldm.pipelines.infotext.controlnet_units` numbers it `ControlNet N`: in the
    request's order of units, or after the run's ControlNet units): `Module: ip-adapter_clip_h, Model: NAME,
    Weight: …, Resize Mode: Crop and Resize, Processor Res: 512, Guidance Start: …, Guidance End: …, Pixel Perfect:
    False, Control Mode: Balanced`; module ip-adapter_clip_g for a ViT-bigG/14 encoder (width 1664), else clip_h;
    NAME the adapter file's name without its suffix and, as `control_infotext` writes a ControlNet's, without a hash.
    sd-webui-controlnet's unit has one reference image; ldm writes one unit per image prompt whatever its number of
    images (the text holds none of them). The adapter is the one the run loaded (kept; a weight-0 prompt's too,
    `check_left_out`); the encoder's width is read from its config."""
    adapter = ip_adapter(pipe, prompt.adapter)
    module = "ip-adapter_clip_g" if encoder_config(prompt, adapter)[0].hidden_size == 1664 else "ip-adapter_clip_h"
    fields = {"Module": module, "Model": adapter_name(prompt), "Weight": prompt.weight,
              "Resize Mode": "Crop and Resize", "Processor Res": 512, "Guidance Start": prompt.start,
              "Guidance End": prompt.end, "Pixel Perfect": False, "Control Mode": "Balanced"}
    return ", ".join(f"{key}: {value}" for key, value in fields.items())
