"""AUTOMATIC1111's generation-parameters text (the "infotext" a PNG carries in its `parameters` chunk): written
for every image (`infotext`), and read back into the request that makes the image again (`read_infotext`,
`read_png`; `ldm generate --from-png`).

    back = read_png("astronaut.png")
    result = pipe(back.request.replace(steps=30))   # the same image, but for the steps

The reading follows A1111's `parse_generation_parameters` (modules/infotext_utils.py): the last line holds
`Key: value, …`, a line starting with `Negative prompt:` starts the negative prompt, quoted values are JSON
strings; the keys are those `StableDiffusion.annotate` writes.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ldm.choices import (
    CONTROL_MODES,
    CONTROL_PREPROCESSORS,
    CONTROL_RESIZE_MODES,
    EMPHASES,
    HIRES_UPSCALERS,
    SAMPLER_LABELS,
)
from ldm.errors import InputError
from ldm.pipelines.images import load_image
from ldm.pipelines.request import GenerationRequest


def quote(value) -> str:
    """A1111's quoting of an infotext value: as a JSON string when it holds `,`, `:` or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """AUTOMATIC1111's generation-parameters text: prompt, negative prompt, then `Key: value, …` (None values
    left out)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, {key: value}) of an A1111 `parameters` text, as A1111's
    `parse_generation_parameters` reads it: the last line holds the parameters, a line starting with
    `Negative prompt:` starts the negative prompt, quoted values are JSON strings."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:  # no parameters line
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    params = {}
    for key, value in RE_PARAM.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        params[key.strip()] = value
    return "\n".join(prompt), "\n".join(negative), params


def png_parameters(path: str | Path) -> str:
    """The `parameters` text chunk of a PNG, or an InputError saying there is none."""
    image = load_image(path, "--from-png")
    text = image.info.get("parameters")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"--from-png {path}: the image carries no generation parameters (no A1111 'parameters' "
                         "text chunk)")
    return text


@dataclass(frozen=True)
class ReadBack:
    """What an infotext says of the run that made its image. `request`: a `GenerationRequest` of what it gives
    (every other field at its default; unchecked, and without the image of an image-to-image run, which the
    text cannot hold); `fields`: the request fields it set, the ones a caller's own values may override;
    `seamless`: its `Tiling` (the model setting `RunSettings.seamless`); `model`, `refiner`, `refiner_start`:
    what it names of the models (their weights are not in the text)."""

    request: GenerationRequest
    fields: frozenset[str]
    seamless: bool = False
    model: str | None = None
    refiner: str | None = None
    refiner_start: str | None = None  # as written ("0.8"), or None
    # the ControlNet units it names, in order: model (its name), weight, start, end, mode (their control images are
    # not in the text: the caller gives them)
    controls: tuple[dict, ...] = ()
    # where its image sits in the batch the request makes: the `Batch pos` of an image-to-image batch, whose images
    # come from one random stream, so that the image is made again only with its whole batch (None: made alone)
    batch_pos: int | None = None

    def notes(self, model: str | None, refiner_chosen: bool) -> list[str]:
        """What to say of the models of a run that reuses these parameters: `model` is the one it runs when the
        user did not choose one (None: the user chose); `refiner_chosen`: the user chose the refiner (or none)."""
        notes = []
        if self.model and model is not None:
            notes.append(f"the PNG was made with {self.model}; this run uses --model {model}")
        if self.refiner and not refiner_chosen:
            notes.append(f"the PNG was finished by the refiner {self.refiner} from {self.refiner_start or '?'}: "
                         "pass --refiner (and --refiner-start) to do the same")
        return notes


def read_png(path: str | Path, with_image: bool = False) -> ReadBack:
    """`read_infotext` of a PNG's `parameters` chunk (errors name it as `--from-png PATH`)."""
    return read_infotext(png_parameters(path), f"--from-png {path}", with_image)


def read_infotext(text: str, source: str = "the infotext", with_image: bool = False) -> ReadBack:
    """An A1111 infotext → the request that makes its image again: prompt, negative prompt, steps, sampler and
    schedule, CFG scale and rescale, seed, size, clip skip, eta, emphasis, prompt syntax, the hires fix, and the
    strength of an image-to-image run — which needs the caller's own image (`with_image`; without it, an
    InputError). A value ldm cannot read or does not have is an InputError that begins with `source`."""
    prompt, negative, params = parse_infotext(text)
    batch_pos = None
    found = {"prompt": prompt, "negative_prompt": negative or None} | _numbers(params, source)
    if "Size" in params:
        size = params["Size"].split("x")
        if len(size) != 2 or not all(v.isdigit() for v in size):
            raise InputError(f"{source}: Size: {params['Size']!r} is not WxH", field="width")
        found["width"], found["height"] = int(size[0]), int(size[1])
    found |= _sampler(params, source)
    emphasis = {v: k for k, v in EMPHASES.items()}.get(params.get("Emphasis", "Original"))
    if emphasis is None:
        raise InputError(f"{source}: emphasis {params['Emphasis']!r} is not one ldm has", field="emphasis")
    found["emphasis"] = emphasis
    found["prompt_syntax"] = params.get("Prompt syntax", "a1111")
    if "Timestep spacing" in params:  # ldm's own key (A1111's schedulers do not space timesteps)
        found["timestep_spacing"] = params["Timestep spacing"]
    if "Hires upscale" in params:  # the hires fix: its strength is the second pass's
        found |= _hires(params, source)
    elif "Denoising strength" in params:
        if not with_image:
            raise InputError(f"{source}: the image was made by image-to-image (Denoising strength "
                             f"{params['Denoising strength']}): give its --image", field="image")
        found["strength"] = _value(params, "Denoising strength", float, source)
        batch_pos = _batch(params, found, source)
    return ReadBack(GenerationRequest(**found), frozenset(found), params.get("Tiling") == "True",
                    params.get("Model") or None, params.get("Refiner") or None, params.get("Refiner switch at"),
                    _controls(params, source), batch_pos=batch_pos)


def _value(params: dict[str, str], key: str, kind: type, source: str):
    try:
        return kind(params[key])
    except ValueError:
        raise InputError(f"{source}: {key}: {params[key]!r} is not a valid value") from None


# (`Eta DDIM` is A1111's key for DDIM's η; `Eta` its key for the ancestral samplers' η, and ldm's for DDIM and TCD)
NUMBERS = (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int),
           ("Clip skip", "clip_skip", int), ("Eta", "eta", float), ("Eta DDIM", "eta", float),
           ("CFG rescale", "guidance_rescale", float))


def _numbers(params: dict[str, str], source: str) -> dict:
    return {field: _value(params, key, kind, source) for key, field, kind in NUMBERS if key in params}


def _batch(params: dict[str, str], found: dict, source: str) -> int | None:
    """An image-to-image batch (`Batch size` N > 1): its images come from one random stream, so the request makes
    all N again (`found["num_images"]`); returns the image's `Batch pos` in it (None: not a batch)."""
    size = _value(params, "Batch size", int, source) if "Batch size" in params else 1
    if size < 2:
        return None
    pos = _value(params, "Batch pos", int, source) if "Batch pos" in params else 0
    if not 0 <= pos < size:
        raise InputError(f"{source}: Batch pos {pos} is not in a batch of {size}", field="num_images")
    found["num_images"] = size
    return pos


def _sampler(params: dict[str, str], source: str) -> dict:
    """`Sampler` (and `Schedule type`) → sampler and karras; A1111 before 1.9 wrote "DPM++ 2M Karras"."""
    sampler = params.get("Sampler")
    if sampler is None:
        return {}
    by_label = {label: name for name, label in SAMPLER_LABELS.items()}
    karras = sampler.endswith(" Karras")
    label = sampler.removesuffix(" Karras")
    if label not in by_label:
        raise InputError(f"{source}: sampler {sampler!r} is not one ldm has ({', '.join(by_label)}): pass "
                         "--sampler", field="sampler")
    return {"sampler": by_label[label], "karras": karras or params.get("Schedule type") == "Karras"}


def _controls(params: dict[str, str], source: str) -> tuple[dict, ...]:
    """sd-webui-controlnet's `ControlNet N: "Module: …, Model: …, Weight: …, …"` units, in order of N: model,
    weight, start, end, mode, resize, preprocess (ldm's names) and the preprocessor's parameters where written."""
    modes = {label: name for name, label in CONTROL_MODES.items()}
    resizes = {label: name for name, label in CONTROL_RESIZE_MODES.items()}
    modules = {label: name for name, label in CONTROL_PREPROCESSORS.items()} | {"none": "none"}
    units = []
    for n in range(len(params)):
        text = params.get(f"ControlNet {n}")
        if text is None:
            break
        fields = dict(part.split(": ", 1) for part in text.split(", ") if ": " in part)
        try:
            units.append({"model": fields["Model"].split(" [")[0], "weight": float(fields.get("Weight", 1.0)),
                          "start": float(fields.get("Guidance Start", 0.0)),
                          "end": float(fields.get("Guidance End", 1.0)),
                          "mode": modes[fields.get("Control Mode", "Balanced")],
                          "resize": resizes[fields.get("Resize Mode", "Just Resize")],
                          "preprocess": modules[fields.get("Module", "none")],
                          "threshold_a": _number(fields.get("Threshold A")),
                          "threshold_b": _number(fields.get("Threshold B")),
                          "processor_res": _number(fields.get("Processor Res"))})
        except (KeyError, ValueError):
            raise InputError(f"{source}: ControlNet {n}: {text!r} is not a unit ldm can read") from None
    return tuple(units)


def _number(text: str | None) -> int | float | None:
    """A number as written (a whole number stays an int, so that it is written back as it was)."""
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _hires(params: dict[str, str], source: str) -> dict:
    """The hires fix's scale, steps, strength (`Denoising strength`: the second pass's) and upscaler."""
    found = {"hires_scale": _value(params, "Hires upscale", float, source)}
    for key, field, kind in (("Hires steps", "hires_steps", int), ("Denoising strength", "hires_denoise", float)):
        if key in params:
            found[field] = _value(params, key, kind, source)
    by_name = {label: name for name, label in HIRES_UPSCALERS.items()}
    upscaler = params.get("Hires upscaler", "Latent")
    if upscaler not in by_name:
        raise InputError(f"{source}: hires upscaler {upscaler!r} is not one ldm has ({', '.join(by_name)}): pass "
                         "--hires-upscaler", field="hires_upscaler")
    found["hires_upscaler"] = by_name[upscaler]
    return found
