"""AUTOMATIC1111's generation-parameters text (the "infotext" a PNG carries in its `parameters` chunk, a JPEG or
WebP in its EXIF UserComment): written for every image (`infotext`), and read back into the request that makes the
image again (`read_infotext`, `read_png`; `ldm generate --from-png`; the A1111 API's png-info route reads images
with `image_infotext`).

    back = read_png("astronaut.jpg")
    result = pipe(back.request.replace(steps=30))   # the same image, but for the steps

The reading follows A1111 1.10: `read_info_from_image` (modules/images.py) finds the text, and
`parse_generation_parameters` (modules/infotext_utils.py) splits it: the last line holds `Key: value, …`, a line
starting with `Negative prompt:` starts the negative prompt, quoted values are JSON strings. The keys read are
those `StableDiffusion.annotate` writes and the ones A1111 wrote before 1.0 and 1.9 (combined sampler labels,
8-digit model hashes); any other key is named in a note ("not used: …") rather than passed over in silence.
"""

import difflib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ldm.choices import (
    A1111_AUTOMATIC_SCHEDULES,
    A1111_SCHEDULES,
    CONTROL_MODES,
    CONTROL_PREPROCESSORS,
    CONTROL_RESIZE_MODES,
    EMPHASES,
    HIRES_UPSCALERS,
    NEAREST_SAMPLERS,
    SAMPLER_LABELS,
)
from ldm.errors import InputError
from ldm.loading.hashes import sha256
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
    `parse_generation_parameters` reads it: the last line holds the parameters (indented or not), a line
    starting with `Negative prompt:` starts the negative prompt (on that line or the next), each line is stripped
    and a line is joined to an empty text without a newline, quoted values are JSON strings."""
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:  # no parameters line
        lines.append(last)
        last = ""
    prompt, negative, in_negative = "", "", False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        if in_negative:
            negative += ("\n" if negative else "") + line
        else:
            prompt += ("\n" if prompt else "") + line
    params = {}
    for key, value in RE_PARAM.findall(last):
        value = value.strip()
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        params[key.strip()] = value
    return prompt, negative, params


EXIF_IFD, USER_COMMENT = 0x8769, 0x9286  # the Exif sub-IFD and its UserComment tag
# UserComment's 8-byte character-code prefixes → the codec piexif decodes them with (piexif/helper.py: UserComment)
USER_COMMENT_CODES = {b"ASCII\0\0\0": ("ASCII", "ascii"), b"JIS\0\0\0\0\0": ("JIS", "shift_jis"),
                      b"UNICODE\0": ("UNICODE", "utf_16_be")}


def user_comment(data: bytes) -> tuple[str, str]:
    """(text, its encoding) of an EXIF UserComment, as A1111's `read_info_from_image` decodes it: piexif's
    `UserComment.load` (the prefix names ASCII, JIS or UNICODE, undecodable bytes replaced), else the bytes as
    UTF-8 with the undecodable ones dropped — less the NUL padding of an undefined prefix, which A1111 keeps."""
    name, codec = USER_COMMENT_CODES.get(bytes(data[:8]), (None, None))
    if codec is not None:
        return bytes(data[8:]).decode(codec, errors="replace"), name
    return bytes(data).decode("utf8", errors="ignore").strip("\0"), "undefined"


def image_infotext(image: Image.Image) -> tuple[str, str]:
    """(an image's A1111 parameters text, where it was found), ("", "") when it has none, as A1111 1.10's
    `read_info_from_image` (modules/images.py) finds it: the PNG text chunk `parameters`, replaced by the EXIF
    UserComment where there is a non-empty one (A1111 writes JPEG and WebP parameters there with piexif's
    `UserComment.dump(…, encoding="unicode")`), else a GIF's comment. The EXIF is read with Pillow."""
    text, where = image.info.get("parameters"), "its PNG text chunk 'parameters'"
    if not isinstance(text, str):
        text, where = "", ""
    if "exif" in image.info:
        try:
            comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
        except Exception:  # (whatever Pillow's EXIF parser raised: a broken EXIF block holds no parameters)
            comment = None
        if isinstance(comment, bytes) and (found := user_comment(comment))[0]:
            text, where = found[0], f"its EXIF UserComment ({found[1]})"
    elif isinstance(image.info.get("comment"), bytes):  # (a GIF's)
        text, where = image.info["comment"].decode("utf8", errors="ignore"), "its GIF comment"
    return text, where


def image_parameters(path: str | Path) -> tuple[str, str]:
    """(the A1111 parameters of an image file, where they were found), or an InputError saying there are none."""
    text, where = image_infotext(load_image(path, "--from-png"))
    if not text.strip():
        raise InputError(f"--from-png {path}: the image carries no generation parameters (no A1111 'parameters' "
                         "text chunk, no EXIF UserComment)")
    return text, where


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
    # the IP-Adapter units it names (sd-webui-controlnet's ControlNet units of an IP-Adapter module), in order: model
    # (its name), weight, start, end, encoder ("h": ViT-H/14, "g": ViT-bigG/14, None: ip-adapter-auto's, the one the
    # adapter's width picks) (their reference images are not in the text: the caller gives them)
    image_prompts: tuple[dict, ...] = ()
    # where its image sits in the batch the request makes: the `Batch pos` of an image-to-image batch, whose images
    # come from one random stream, so that the image is made again only with its whole batch (None: made alone)
    batch_pos: int | None = None
    # what reading the text found to say: (the request fields a remark is about — left out when the caller sets
    # them all itself —, the remark)
    remarks: tuple[tuple[tuple[str, ...], str], ...] = ()
    unused: tuple[str, ...] = ()  # the keys it holds that ldm does not use
    model_hash: str | None = None  # its `Model hash`, as written

    def notes(self, model: str | None, refiner_chosen: bool, given: frozenset[str] = frozenset(),
              model_file: str | Path | None = None) -> list[str]:
        """What to say of a run that reuses these parameters: the remarks on fields it does not set itself
        (`given`), its models — `model` is the one it runs when the user did not choose one (None: the user
        chose); `refiner_chosen`: the user chose the refiner (or none) — and one line naming the keys not used
        (the Model hash among them unless it names `model_file`, the run's checkpoint file)."""
        notes = [text for fields, text in self.remarks if not fields or not set(fields) <= given]
        if self.model and model is not None:
            notes.append(f"the PNG was made with {self.model}; this run uses --model {model}")
        if self.refiner and not refiner_chosen:
            notes.append(f"the PNG was finished by the refiner {self.refiner} from {self.refiner_start or '?'}: "
                         "pass --refiner (and --refiner-start) to do the same")
        unused = list(self.unused)
        if self.model_hash and not model_hash_matches(model_file, self.model_hash):
            unused.append(f"Model hash ({self.model_hash}: not this run's model file)")
        if unused:
            notes.append(f"not used: {', '.join(unused)}")
        return notes


def read_png(path: str | Path, with_image: bool = False, given: frozenset[str] = frozenset()) -> ReadBack:
    """`read_infotext` of an image's A1111 parameters: a PNG's `parameters` chunk, a JPEG's or WebP's EXIF
    UserComment (`image_infotext`; errors name it as `--from-png PATH`, a remark says where they were found)."""
    text, where = image_parameters(path)
    return read_infotext(text, f"--from-png {path}", with_image, given, where)


def read_infotext(text: str, source: str = "the infotext", with_image: bool = False,
                  given: frozenset[str] = frozenset(), where: str | None = None) -> ReadBack:
    """An A1111 infotext → the request that makes its image again: prompt, negative prompt, steps, sampler and
    schedule, CFG scale and rescale, seed, size, clip skip, eta, emphasis, prompt syntax, the hires fix, the
    batch, and the strength of an image-to-image run — which needs the caller's own image (`with_image`;
    without it, an InputError). A value ldm cannot read or does not have is an InputError that begins with
    `source`, unless the caller sets that field itself (`given`: the request fields it sets). `where`: where
    the text was found (a remark)."""
    prompt, negative, params = parse_infotext(text)
    remarks = [((), f"parameters read from {where}")] if where else []
    batch_pos = None
    found = {"prompt": prompt, "negative_prompt": negative or None} | _numbers(params, source)
    found |= _size(params, source, remarks) | _sampler(params, source, given) | _prompt_options(params, source)
    if "Hires upscale" in params:  # the hires fix: its strength is the second pass's
        found |= _hires(params, source, given, remarks)
    if "Denoising strength" in params and "Hires upscale" not in params:
        if not with_image:
            raise InputError(f"{source}: the image was made by image-to-image (Denoising strength "
                             f"{params['Denoising strength']}): give its --image", field="image")
        found["strength"] = _value(params, "Denoising strength", float, source)
        batch_pos = _batch(params, found, source)
    else:
        _text_batch(params, found, source, remarks)
    return ReadBack(GenerationRequest(**found), frozenset(found), params.get("Tiling") == "True",
                    params.get("Model") or None, params.get("Refiner") or None, params.get("Refiner switch at"),
                    *_controls(params, source), batch_pos=batch_pos, remarks=tuple(remarks),
                    unused=tuple(key for key in params if not _used(key)), model_hash=params.get("Model hash"))


# the keys ldm reads (the Model hash is compared with the run's model file: `ReadBack.notes`), and the ones it
# writes that describe what the prompt itself names (its embeddings' and LoRAs' hashes)
USED_KEYS = frozenset({"Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Clip skip", "Eta",
                       "Eta DDIM", "CFG rescale", "Emphasis", "Prompt syntax", "Timestep spacing", "Hires upscale",
                       "Hires steps", "Hires upscaler", "Denoising strength", "Batch size", "Batch pos", "Tiling",
                       "Model", "Refiner", "Refiner switch at", "Model hash", "TI hashes", "Lora hashes"})


def _used(key: str) -> bool:
    return key in USED_KEYS or re.fullmatch(r"ControlNet \d+", key) is not None


def model_hash_matches(path: str | Path | None, written: str) -> bool:
    """Whether an infotext's `Model hash` names the checkpoint file at `path`: since A1111 1.0 the first 10 hex
    digits of the file's sha256 (modules/hashes.py: `sha256`, cut by sd_models.CheckpointInfo's `shorthash`),
    before it the first 8 of the sha256 of the 64 KiB at 1 MiB (modules/sd_models.py: `model_hash`)."""
    if path is None or not Path(path).is_file() or not re.fullmatch(r"[0-9a-fA-F]{8,64}", written):
        return False
    written = written.lower()
    if len(written) == 8:
        with open(path, "rb") as f:
            f.seek(0x100000)
            return hashlib.sha256(f.read(0x10000)).hexdigest()[:8] == written
    return sha256(path).startswith(written)


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


LATENT_GRID = 8  # A1111's opt_f: the pixels of a latent


def _size(params: dict[str, str], source: str, remarks: list) -> dict:
    """`Size: WxH` → width and height, rounded down to the latent grid as A1111 works at them: its latents are
    (height // 8, width // 8) (modules/processing.py, process_images_inner: `rng.ImageRNG((opt_C, p.height //
    opt_f, p.width // opt_f), …)`, opt_f = 8), so a 540x960 text gives a 536x960 image; a remark says so."""
    if "Size" not in params:
        return {}
    size = re.fullmatch(r"(\d+)x(\d+)", params["Size"])  # (A1111's re_imagesize)
    if size is None:
        raise InputError(f"{source}: Size: {params['Size']!r} is not WxH", field="width")
    width, height = int(size[1]), int(size[2])
    grid = (width // LATENT_GRID * LATENT_GRID, height // LATENT_GRID * LATENT_GRID)
    if grid != (width, height):
        remarks.append((("width", "height"), f"Size {width}x{height} is not a multiple of {LATENT_GRID}: A1111 works "
                        f"at {grid[0]}x{grid[1]} (its latent grid), and so does this run"))
    return {"width": grid[0], "height": grid[1]}


def _prompt_options(params: dict[str, str], source: str) -> dict:
    """Emphasis, prompt syntax and ldm's own `Timestep spacing` (A1111's schedulers do not space timesteps)."""
    emphasis = {v: k for k, v in EMPHASES.items()}.get(params.get("Emphasis", "Original"))
    if emphasis is None:
        raise InputError(f"{source}: emphasis {params['Emphasis']!r} is not one ldm has", field="emphasis")
    found = {"emphasis": emphasis, "prompt_syntax": params.get("Prompt syntax", "a1111")}
    if "Timestep spacing" in params:
        found["timestep_spacing"] = params["Timestep spacing"]
    return found


def _batch_place(params: dict[str, str], source: str) -> tuple[int, int | None]:
    """(`Batch size`, `Batch pos` or None), the position checked to be in the batch."""
    size = _value(params, "Batch size", int, source) if "Batch size" in params else 1
    pos = _value(params, "Batch pos", int, source) if "Batch pos" in params and size > 1 else None
    if pos is not None and not 0 <= pos < size:
        raise InputError(f"{source}: Batch pos {pos} is not in a batch of {size}", field="num_images")
    return size, pos


def _batch(params: dict[str, str], found: dict, source: str) -> int | None:
    """An image-to-image batch (`Batch size` N > 1): its images come from one random stream, so the request makes
    all N again (`found["num_images"]`); returns the image's `Batch pos` in it (None: not a batch)."""
    size, pos = _batch_place(params, source)
    if size < 2:
        return None
    found["num_images"] = size
    return pos or 0


def _text_batch(params: dict[str, str], found: dict, source: str, remarks: list) -> None:
    """A text-to-image batch, as A1111's seeds give its images: image i of a batch has the seed + i, its `Seed`
    (modules/processing.py: `all_seeds`, written per image by create_infotext), so an image with its `Batch pos`
    is that image alone; a `Batch size` without one makes the N images again, seeds seed + i."""
    size, pos = _batch_place(params, source)
    if size > 1 and pos is None:
        found["num_images"] = size
        seeds = f"seeds {found['seed']} to {found['seed'] + size - 1}" if "seed" in found else "seeds seed + i"
        remarks.append((("num_images",), f"Batch size {size}: {size} images are made, {seeds}, as A1111's batch"))


def _sampler(params: dict[str, str], source: str, given: frozenset[str]) -> dict:
    """`Sampler` and `Schedule type` → sampler and karras, as A1111 1.10's `get_sampler_and_scheduler`
    (modules/sd_samplers.py) reads them: a label ending with a schedule ("DPM++ 2M Karras", A1111 before 1.9)
    is the sampler with that schedule, and `Automatic` runs the sampler's own (`A1111_AUTOMATIC_SCHEDULES`; no
    `Schedule type` at all — ldm's text, or A1111's before 1.9 — is the sampler's default σ). A sampler or schedule
    ldm lacks is an InputError naming the nearest it has, unless the caller gives the sampler (or --karras)."""
    label, schedule = params.get("Sampler"), params.get("Schedule type")
    if label is None:
        return {}
    for option in A1111_SCHEDULES:
        if label.endswith(f" {option}"):
            label, schedule = label[:-len(option) - 1], option
            break
    written = schedule
    schedule = A1111_AUTOMATIC_SCHEDULES.get(label, schedule) if schedule == "Automatic" else schedule
    by_label = {text: name for name, text in SAMPLER_LABELS.items()}
    found = {"karras": schedule == "Karras"}
    if "sampler" not in given:
        if label not in by_label:
            nearest = NEAREST_SAMPLERS.get(label) or [by_label[near] for near in difflib.get_close_matches(
                label, list(by_label), n=2, cutoff=0)]
            raise InputError(f"{source}: sampler {label!r} is not one ldm has; the nearest it has: "
                             f"{', '.join(f'{n} ({SAMPLER_LABELS[n]})' for n in nearest)} (pass --sampler)",
                             field="sampler")
        found["sampler"] = by_label[label]
    if schedule not in (None, "Automatic", "Karras") and not {"sampler", "karras"} & given:
        automatic = f" (A1111's Automatic for {label})" if written == "Automatic" else ""
        raise InputError(f"{source}: schedule {schedule!r}{automatic} of {params['Sampler']} is not one ldm has (it "
                         "has Karras, and each sampler's own): pass --karras, or --sampler for its own", field="karras")
    return found


# sd-webui-controlnet's IP-Adapter modules (its preprocessors; the older names too: `ip-adapter_clip_sd15` and
# `ip-adapter_clip_sdxl_plus_vith` are today's clip_h, `ip-adapter_clip_sdxl` its clip_g) → the image encoder each
# runs: "h" ViT-H/14, "g" ViT-bigG/14, None (ip-adapter-auto) the one the adapter reads
IP_ADAPTER_MODULES = {"ip-adapter_clip_h": "h", "ip-adapter_clip_g": "g", "ip-adapter_clip_sd15": "h",
                      "ip-adapter_clip_sdxl": "g", "ip-adapter_clip_sdxl_plus_vith": "h", "ip-adapter-auto": None}
ENCODER_WIDTHS = {"h": 1280, "g": 1664}  # the towers' hidden sizes (h94/IP-Adapter's two image encoders)
FACE_ID_MODULES = "ip-adapter_face_id"  # (the prefix of its FaceID modules: ip-adapter_face_id, …_face_id_plus)


def controlnet_units(units: list[tuple[object, str]]) -> dict[str, str]:
    """sd-webui-controlnet's `ControlNet N` entries for (unit, its infotext) pairs, as its `get_enabled_units` and
    `Infotext.write_infotext` number them: 0, 1, … over the enabled units in the request's order, which each unit's
    `unit` (its index there) gives where every one has its own (a request of the A1111 API: ControlNet and
    IP-Adapter units interleaved as sent); else in the order given."""
    positions = [getattr(unit, "unit", None) for unit, _ in units]
    if None in positions or len(set(positions)) < len(positions):
        positions = list(range(len(units)))
    ordered = [text for _, text in sorted(zip(positions, [text for _, text in units], strict=True))]
    return {f"ControlNet {n}": text for n, text in enumerate(ordered)}


def _controls(params: dict[str, str], source: str) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """sd-webui-controlnet's `ControlNet N: "Module: …, Model: …, Weight: …, …"` units, in order of N (a number
    missing, as in a text edited by hand, skips none of the others): (the ControlNet units, `_control`; the
    IP-Adapter units, those of an IP-Adapter module, `_image_prompt`). A FaceID unit is an InputError: ldm does not
    run FaceID adapters."""
    units, prompts = [], []
    numbers = sorted(int(key.split()[1]) for key in params if re.fullmatch(r"ControlNet \d+", key))
    for n in numbers:
        text = params[f"ControlNet {n}"]
        fields = dict(part.split(": ", 1) for part in text.split(", ") if ": " in part)
        module = fields.get("Module", "none")
        if module.startswith(FACE_ID_MODULES):
            raise InputError(f"{source}: ControlNet {n} is an IP-Adapter FaceID unit ({module}): FaceID adapters "
                             "(their InsightFace face embeddings) are not read by ldm", field="image_prompts")
        try:
            if module in IP_ADAPTER_MODULES:
                prompts.append(_image_prompt(fields))
            else:
                units.append(_control(fields))
        except (KeyError, ValueError):
            raise InputError(f"{source}: ControlNet {n}: {text!r} is not a unit ldm can read") from None
    return tuple(units), tuple(prompts)


def _control(fields: dict[str, str]) -> dict:
    """A ControlNet unit: model, weight, start, end, mode, resize, preprocess (ldm's names), the preprocessor's
    parameters where written and pixel perfect (`Pixel Perfect: True`)."""
    modes = {label: name for name, label in CONTROL_MODES.items()}
    resizes = {label: name for name, label in CONTROL_RESIZE_MODES.items()}
    modules = {label: name for name, label in CONTROL_PREPROCESSORS.items()} | {"none": "none"}
    return {"model": fields["Model"].split(" [")[0], "weight": float(fields.get("Weight", 1.0)),
            "start": float(fields.get("Guidance Start", 0.0)), "end": float(fields.get("Guidance End", 1.0)),
            "mode": modes[fields.get("Control Mode", "Balanced")],
            "resize": resizes[fields.get("Resize Mode", "Just Resize")],
            "preprocess": modules[fields.get("Module", "none")],
            "threshold_a": _number(fields.get("Threshold A")), "threshold_b": _number(fields.get("Threshold B")),
            "processor_res": _number(fields.get("Processor Res")),
            "pixel_perfect": fields.get("Pixel Perfect") == "True"}


def _image_prompt(fields: dict[str, str]) -> dict:
    """An IP-Adapter unit: model (its name, A1111's ` [hash]` left out), weight, start, end and the encoder its
    module runs (`IP_ADAPTER_MODULES`). Its resize and control modes are not read (ldm's image prompts take CLIP's
    crop of the reference, as diffusers' do, and have no control mode)."""
    return {"model": fields["Model"].split(" [")[0], "weight": float(fields.get("Weight", 1.0)),
            "start": float(fields.get("Guidance Start", 0.0)), "end": float(fields.get("Guidance End", 1.0)),
            "encoder": IP_ADAPTER_MODULES[fields["Module"]]}


def _number(text: str | None) -> int | float | None:
    """A number as written (a whole number stays an int, so that it is written back as it was)."""
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else float(text)


def _hires(params: dict[str, str], source: str, given: frozenset[str], remarks: list) -> dict:
    """The hires fix's scale, steps, strength (`Denoising strength`: the second pass's) and upscaler; an upscaler
    ldm lacks (A1111's ESRGAN models: "R-ESRGAN 4x+") falls back to Latent with a remark, unless the caller gives
    its own."""
    found = {"hires_scale": _value(params, "Hires upscale", float, source)}
    for key, field, kind in (("Hires steps", "hires_steps", int), ("Denoising strength", "hires_denoise", float)):
        if key in params:
            found[field] = _value(params, key, kind, source)
    by_name = {label: name for name, label in HIRES_UPSCALERS.items()}
    upscaler = params.get("Hires upscaler", "Latent")
    if upscaler in by_name:
        found["hires_upscaler"] = by_name[upscaler]
    elif "hires_upscaler" not in given:
        found["hires_upscaler"] = "latent"
        remarks.append((("hires_upscaler",), f"hires upscaler {upscaler!r} is not one ldm has ({', '.join(by_name)}): "
                        "the hires pass upscales with Latent (pass --hires-upscaler to choose)"))
    return found
