"""Generation parameters as people share them (issue 31): A1111's infotexts in a PNG text chunk and in a JPEG's or
WebP's EXIF UserComment, in the wording of A1111 1.10 and of the versions before 1.0 and 1.9, read by
`ldm generate --from-png` / `--from-image` and the A1111 API's png-info route.

The images are made here as A1111 writes them (modules/images.py, save_image_with_geninfo: a PNG's `parameters`
text chunk; for JPEG and WebP `piexif.dump({"Exif": {UserComment: piexif.helper.UserComment.dump(text,
encoding="unicode")}})`), the UserComment laid out as piexif's helper lays it out and written with Pillow's EXIF
support (piexif is no dependency). What each gives is A1111's own reading, written below from its source, and
each is made again on the tiny model: the same PNGs as the options A1111's reading names, given by hand."""

import base64
import io
import json
import re

import pytest
from PIL import Image, PngImagePlugin

from ldm.errors import InputError
from ldm.pipelines.infotext import image_infotext, model_hash_matches, read_infotext, read_png, user_comment
from ldm_cli.main import main

# ---- A1111's reading, written from its source ------------------------------------------------------------------

# modules/infotext_utils.py (1.10): re_param_code, re_imagesize
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")


def a1111_unquote(text: str) -> str:
    """modules/infotext_utils.py: unquote."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def a1111_parse(x: str) -> dict:
    """modules/infotext_utils.py (1.10): parse_generation_parameters, its prompt, negative prompt and parameters
    (the styles, hypernet and UI defaults it adds left out)."""
    res, prompt, negative_prompt, done_with_prompt = {}, "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in RE_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = a1111_unquote(v)
        m = RE_IMAGESIZE.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


# modules/sd_schedulers.py (1.10): the schedulers' labels, names and aliases
A1111_SCHEDULERS = [("Automatic", "automatic"), ("Uniform", "uniform"), ("Karras", "karras"),
                    ("Exponential", "exponential"), ("Polyexponential", "polyexponential"),
                    ("SGM Uniform", "sgm_uniform", "SGMUniform"), ("KL Optimal", "kl_optimal"),
                    ("Align Your Steps", "align_your_steps"), ("Simple", "simple"), ("Normal", "normal"),
                    ("DDIM", "ddim"), ("Beta", "beta")]
# modules/sd_samplers_kdiffusion.py (1.10): samplers_k_diffusion, each sampler's options["scheduler"]
A1111_OWN_SCHEDULE = {"DPM++ 2M": "Karras", "DPM++ SDE": "Karras", "DPM++ 2M SDE": "Exponential",
                      "DPM++ 2S a": "Karras", "DPM2": "Karras", "DPM2 a": "Karras"}
# A1111's names of the samplers ldm has → ldm's (as tests/test_infotext.py: A1111_SAMPLER_NAMES)
LDM_SAMPLER = {"Euler a": "euler_a", "Euler": "euler", "LMS": "lms", "Heun": "heun", "DPM++ 2M": "dpmpp_2m",
               "DPM++ 2M SDE": "dpmpp_2m_sde", "DDIM": "ddim", "PLMS": "pndm", "UniPC": "unipc"}


def a1111_sampler_and_schedule(res: dict) -> tuple[str, str]:
    """modules/sd_samplers.py (1.10): get_sampler_and_scheduler splits a label ending with a schedule; then
    KDiffusionSampler.get_sigmas runs `Automatic` as the sampler's own schedule. A text without `Schedule type`
    (A1111 before 1.9, where the sampler named its schedule, and ldm's) is the sampler's default σ: A1111 1.10
    pastes it as Automatic, which for DPM++ 2M is Karras — ldm keeps what the text meant when written."""
    name, found = res["Sampler"], res.get("Schedule type")
    for scheduler in A1111_SCHEDULERS:
        for option in scheduler:
            if name.endswith(" " + option):
                found, name = scheduler[0], name[0:-(len(option) + 1)]
                break
    if found == "Automatic":
        found = A1111_OWN_SCHEDULE.get(name, "Automatic")
    return name, found or "Automatic"


# piexif/helper.py: UserComment's prefixes and codecs
PIEXIF_PREFIX = {"ascii": (b"ASCII\x00\x00\x00", "ascii"), "jis": (b"JIS\x00\x00\x00\x00\x00", "shift_jis"),
                 "unicode": (b"UNICODE\x00", "utf_16_be")}


def piexif_dump(text: str, encoding: str = "unicode") -> bytes:
    """piexif/helper.py: UserComment.dump."""
    prefix, codec = PIEXIF_PREFIX[encoding]
    return prefix + text.encode(codec, errors="replace")


def piexif_load(data: bytes) -> str:
    """piexif/helper.py: UserComment.load (ValueError: not a UserComment it decodes)."""
    if len(data) < 8 or data[:8] == b"\x00" * 8:
        raise ValueError("undefined")
    codecs = {prefix: codec for prefix, codec in PIEXIF_PREFIX.values()}
    if data[:8] not in codecs:
        raise ValueError("unknown prefix")
    return data[8:].decode(codecs[data[:8]], errors="replace")


def a1111_read_info(image: Image.Image) -> str:
    """modules/images.py (1.10): read_info_from_image's text: `parameters`, replaced by a non-empty EXIF
    UserComment (piexif's load, else the bytes as UTF-8)."""
    geninfo = image.info.get("parameters", "")
    if "exif" in image.info:
        comment = image.getexif().get_ifd(0x8769).get(0x9286, b"")
        try:
            comment = piexif_load(comment)
        except ValueError:
            comment = comment.decode("utf8", errors="ignore")
        if comment:
            geninfo = comment
    elif "comment" in image.info:  # for gif
        geninfo = image.info["comment"].decode("utf8", errors="ignore")
    return geninfo


def save_as_a1111(text: str, path, encoding: str = "unicode"):
    """An image with `text` where A1111 writes it for the path's format."""
    picture = Image.new("RGB", (16, 16), (90, 120, 200))
    if path.suffix == ".png":
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        picture.save(path, pnginfo=info)
    else:
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9286] = piexif_dump(text, encoding)
        picture.save(path, exif=exif.tobytes(), quality=90)
    return path


# ---- the table ---------------------------------------------------------------------------------------------------

A1111_110 = ("a lighthouse at night, (stars:1.2)\nNegative prompt: fog, blur\n"
             "Steps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 6, Seed: 11, Size: 70x50, "
             "Model hash: 0123456789, Model: dreamshaper_8, ADetailer model: face_yolov8n.pt, ADetailer confidence: "
             '0.3, Conditional mask weight: 1.0, EmbeddingMerge: "cat: dog", ENSD: 31337, Version: v1.10.1')
BEFORE_1_0 = ("a red door, wooden\nNegative prompt:\nblurry, dark\n"
              "\tSteps: 3, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 21, Size: 64x64, Model hash: 925997e9, "
              "Batch size: 2, Batch pos: 1")
BATCH_HIRES = ("a blue bird\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 7, Size: 64x64, "
               "Batch size: 2, Denoising strength: 0.5, Hires upscale: 1.5, Hires steps: 2, "
               "Hires upscaler: R-ESRGAN 4x+, Version: v1.7.0")
TEXTS = {"1.10": A1111_110, "before 1.0": BEFORE_1_0, "batch and hires": BATCH_HIRES}
FORMS = (".png", ".jpg", ".webp")
WHERE = {".png": "its PNG text chunk 'parameters'", ".jpg": "its EXIF UserComment (UNICODE)",
         ".webp": "its EXIF UserComment (UNICODE)"}


def expected_request(text: str) -> dict:
    """The request fields A1111's reading gives: its prompt, negative prompt, steps, CFG, seed, sampler and
    schedule, its size on the latent grid (processing.py: latents of height // 8 × width // 8), the hires fix,
    and a `Batch size` without `Batch pos` as that many images (seeds seed + i)."""
    res = a1111_parse(text)
    sampler, schedule = a1111_sampler_and_schedule(res)
    fields = {"prompt": res["Prompt"], "negative_prompt": res["Negative prompt"] or None,
              "steps": int(res["Steps"]), "guidance": float(res["CFG scale"]), "seed": int(res["Seed"]),
              "sampler": LDM_SAMPLER[sampler], "karras": schedule == "Karras",
              "width": int(res["Size-1"]) // 8 * 8, "height": int(res["Size-2"]) // 8 * 8,
              "num_images": int(res.get("Batch size", 1)) if "Batch pos" not in res else 1}
    if "Hires upscale" in res:
        fields |= {"hires_scale": float(res["Hires upscale"]), "hires_steps": int(res["Hires steps"]),
                   "hires_denoise": float(res["Denoising strength"])}
    return fields


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(TEXTS))
def test_each_form_reads_as_a1111_reads_it(tmp_path, name, form):
    """Each infotext, in each form, is found where A1111's read_info_from_image finds it (a remark says where)
    and reads field by field as A1111's parse_generation_parameters and get_sampler_and_scheduler read it."""
    path = save_as_a1111(TEXTS[name], tmp_path / f"shared{form}")
    with Image.open(path) as image:
        assert image_infotext(image) == (a1111_read_info(image), WHERE[form])
    back = read_png(path)
    request = back.request
    for field, value in expected_request(TEXTS[name]).items():
        assert getattr(request, field) == value, field
    assert f"parameters read from {WHERE[form]}" in back.notes(None, True)[0]


def test_a_gifs_comment_is_read_as_a1111_reads_it(tmp_path):
    Image.new("P", (8, 8)).save(tmp_path / "x.gif", comment=BEFORE_1_0.encode())
    with Image.open(tmp_path / "x.gif") as image:
        assert image_infotext(image) == (a1111_read_info(image), "its GIF comment")
    assert read_png(tmp_path / "x.gif").request.negative_prompt == "blurry, dark"


@pytest.mark.parametrize("encoding, text", [("unicode", "灯台, 夜\nSteps: 3, Seed: 1, Size: 64x64"),
                                            ("jis", "灯台, 夜\nSteps: 3, Seed: 1, Size: 64x64"),
                                            ("ascii", "a door\nSteps: 3, Seed: 1, Size: 64x64")])
def test_user_comment_encodings_decode_as_piexif_does(encoding, text):
    data = piexif_dump(text, encoding)
    assert user_comment(data) == (piexif_load(data), encoding.upper())


def test_an_undefined_user_comment_is_read_as_utf8():
    """A1111's fallback where piexif cannot decode (an undefined prefix): the bytes as UTF-8, less its NULs."""
    data = b"\x00" * 8 + "a door, é\nSteps: 3".encode()
    assert user_comment(data) == (data.decode("utf8", errors="ignore").strip("\x00"), "undefined")


def test_keys_ldm_does_not_use_are_named_in_one_note(tmp_path):
    back = read_png(save_as_a1111(A1111_110, tmp_path / "x.jpg"))
    notes = back.notes(None, True)
    assert notes[-1] == ("not used: ADetailer model, ADetailer confidence, Conditional mask weight, EmbeddingMerge, "
                         "ENSD, Version, Model hash (0123456789: not this run's model file)")
    assert "Size 70x50 is not a multiple of 8: A1111 works at 64x48" in notes[1]
    assert not any("Size" in note for note in back.notes(None, True, frozenset({"width", "height"})))


def test_an_upscaler_ldm_lacks_falls_back_to_latent_unless_one_is_given():
    back = read_infotext(BATCH_HIRES)
    assert back.request.hires_upscaler == "latent"
    assert any("'R-ESRGAN 4x+' is not one ldm has" in note and "upscales with Latent" in note
               for note in back.notes(None, True))
    given = frozenset({"hires_upscaler"})
    assert not any("R-ESRGAN" in note for note in read_infotext(BATCH_HIRES, given=given).notes(None, True, given))


@pytest.mark.parametrize("sampler", ["DPM++ 2M, Schedule type: Automatic", "DPM++ 2M Karras", "Euler a",
                                     "DPM++ 2M SDE Karras", "Heun, Schedule type: Karras", "DPM++ 2M", "LMS Karras"])
def test_sampler_and_schedule_as_a1111_splits_them(sampler):
    text = f"a door\nSteps: 3, Sampler: {sampler}, CFG scale: 7, Seed: 1, Size: 64x64"
    name, schedule = a1111_sampler_and_schedule(a1111_parse(text))
    request = read_infotext(text).request
    assert (request.sampler, request.karras) == (LDM_SAMPLER[name], schedule == "Karras")


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE, Schedule type: Automatic", "Euler, Schedule type: Exponential",
                                     "DPM++ 2M SDE Exponential"])
def test_a_schedule_ldm_lacks_is_an_error_unless_the_sampler_is_given(sampler):
    text = f"a door\nSteps: 3, Sampler: {sampler}, CFG scale: 7, Seed: 1, Size: 64x64"
    assert a1111_sampler_and_schedule(a1111_parse(text))[1] == "Exponential"
    with pytest.raises(InputError, match="schedule 'Exponential'.* is not one ldm has"):
        read_infotext(text)
    assert not read_infotext(text, given=frozenset({"sampler"})).request.karras


def test_old_and_new_model_hashes_name_their_file(tmp_path):
    """A1111 before 1.0: sha256 of the 64 KiB at 1 MiB, 8 hex digits (modules/sd_models.py: model_hash); since
    1.0: the file's sha256, 10 digits (modules/hashes.py: sha256, shorthash)."""
    import hashlib

    model = tmp_path / "model.safetensors"
    model.write_bytes(bytes(range(256)) * 5000)  # 1.2 MiB
    data = model.read_bytes()
    old = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    new = hashlib.sha256(data).hexdigest()[:10]
    assert model_hash_matches(model, old) and model_hash_matches(model, new.upper())
    assert not model_hash_matches(model, new[:8]) and not model_hash_matches(model, "0123456789")
    assert not model_hash_matches(None, old) and not model_hash_matches(tmp_path, old)


# ---- made again on the tiny model ------------------------------------------------------------------------------

def by_hand(text: str) -> list[str]:
    """The options A1111's reading of `text` names, given by hand."""
    fields = expected_request(text)
    options = [fields["prompt"], "--steps", str(fields["steps"]), "--guidance", str(fields["guidance"]), "--seed",
               str(fields["seed"]), "--sampler", fields["sampler"], "--width", str(fields["width"]), "--height",
               str(fields["height"]), "--num-images", str(fields["num_images"])]
    options += ["--karras"] if fields["karras"] else []
    options += ["--negative-prompt", fields["negative_prompt"]] if fields["negative_prompt"] else []
    if "hires_scale" in fields:
        options += ["--hires-scale", str(fields["hires_scale"]), "--hires-steps", str(fields["hires_steps"]),
                    "--hires-denoise", str(fields["hires_denoise"]), "--hires-upscaler", "latent"]
    return options


@pytest.mark.parametrize("name, form, notes", [
    ("1.10", ".jpg", ["parameters read from its EXIF UserComment (UNICODE)", "Size 70x50 is not a multiple of 8",
                      "not used: ADetailer model, ADetailer confidence, Conditional mask weight, EmbeddingMerge, "
                      "ENSD, Version, Model hash (0123456789"]),
    ("before 1.0", ".webp", ["parameters read from its EXIF UserComment (UNICODE)",
                             "not used: Model hash (925997e9"]),
    ("batch and hires", ".png", ["parameters read from its PNG text chunk", "Batch size 2: 2 images are made, "
                                 "seeds 7 to 8", "'R-ESRGAN 4x+' is not one ldm has", "not used: Version"]),
])
def test_made_again_as_a1111s_reading_says(sd1_folder, tmp_path, capsys, name, form, notes):
    """`--from-image` of each makes the PNGs the options of A1111's reading make (byte for byte: the same
    pixels and parameters), and the notes say what was read, rounded, fallen back on and not used."""
    path = save_as_a1111(TEXTS[name], tmp_path / f"shared{form}")
    model = ["--model", str(sd1_folder), "--no-safety-checker"]
    assert main(["generate", *by_hand(TEXTS[name]), "-o", str(tmp_path / "hand.png"), *model]) == 0
    capsys.readouterr()
    assert main(["generate", "--from-image", str(path), "-o", str(tmp_path / "read.png"), *model]) == 0
    err = capsys.readouterr().err
    for note in notes:
        assert note in err
    made = sorted(p.name for p in tmp_path.glob("read*.png"))
    assert made == [p.name.replace("hand", "read") for p in sorted(tmp_path.glob("hand*.png"))]
    for read in made:
        assert (tmp_path / read).read_bytes() == (tmp_path / read.replace("read", "hand")).read_bytes(), read


def test_the_old_hash_of_the_runs_model_file_is_used(single_file, tmp_path, capsys, monkeypatch):
    """A pre-1.0 `Model hash` naming the run's own checkpoint file is used (no note); another is named."""
    import hashlib

    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    model = single_file("sd1")
    with open(model, "rb") as f:
        f.seek(0x100000)
        old = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    text = f"a door\nSteps: 1, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, Model hash: {old}"
    back = read_infotext(text)
    assert not any("not used" in note for note in back.notes(None, True, frozenset(), model))
    assert "not used: Model hash" in back.notes(None, True, frozenset(), None)[-1]


@pytest.mark.parametrize("sampler, nearest", [("DPM++ SDE Karras", "dpmpp_2m_sde (DPM++ 2M SDE), dpmpp_2m (DPM++ 2M)"),
                                              ("DPM2 a", "euler_a (Euler a), dpmpp_2m_sde (DPM++ 2M SDE)")])
def test_a_sampler_ldm_lacks_is_one_line_naming_the_nearest(sd1_folder, tmp_path, capsys, sampler, nearest):
    path = save_as_a1111(f"a door\nSteps: 3, Sampler: {sampler}, CFG scale: 7, Seed: 1, Size: 64x64",
                         tmp_path / "x.jpg")
    assert main(["generate", "--from-png", str(path), "--model", str(sd1_folder), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert f"the nearest it has: {nearest}" in err and err.count("\n") == 1


def test_a_size_off_the_grid_on_the_command_line_offers_the_nearest(sd1_folder, tmp_path, capsys):
    assert main(["generate", "x", "--width", "540", "--model", str(sd1_folder), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "width must be a positive multiple of 8, got 540; the nearest are 536 and 544" in err
    assert err.count("\n") == 1


def test_png_info_route_reads_a_jpeg(sd1_folder):
    """The A1111 API's png-info route reads a JPEG's EXIF UserComment as A1111's does."""
    from test_serve import Server

    from ldm.pipelines.stable_diffusion import StableDiffusion
    from ldm.serving.server import ServeConfig

    buffer = io.BytesIO()
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = piexif_dump(A1111_110)
    Image.new("RGB", (16, 16)).save(buffer, "JPEG", exif=exif.tobytes())
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    server = Server(lambda: pipe, ServeConfig(queue_size=2))
    try:
        status, _, info = server.request("POST", "/sdapi/v1/png-info",
                                         {"image": base64.b64encode(buffer.getvalue()).decode()})
    finally:
        server.close()
    assert status == 200 and info["info"] == A1111_110
    params = info["parameters"]
    assert params["Sampler"] == "Euler a" and params["Prompt"] == a1111_parse(A1111_110)["Prompt"]
