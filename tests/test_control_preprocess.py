"""ControlNet preprocessors and resize modes (ldm.pipelines.preprocess, control_image) against sd-webui-controlnet
(Mikubill/sd-webui-controlnet at 56cec5b), whose code is written out below as the rule, with OpenCV as the reference
where that code calls it: canny bit for bit against cv2.Canny after `resize_image_with_pad`, invert, threshold,
tile_resample, blur_gaussian, shuffle (its flow field from numpy's global generator, seeded as `set_numpy_seed`
seeds it), and "Crop and Resize" / "Resize and Fill" as `detectmap_proc` and `high_quality_resize` fit a map (every
branch of it: nearest, area, cubic, black-and-white maps, one-pixel edges thinned and pruned). Then the checks of a
unit, its infotext, `ldm preprocess`, and `ldm generate --control-preprocess` end to end: the same image as
generating with the control image `ldm preprocess` made."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from test_controlnet import make_controlnet

from ldm.choices import CONTROL_PREPROCESSOR_PARAMS, CONTROL_PREPROCESSORS, CONTROL_RESOLUTION_PREPROCESSORS
from ldm.errors import LdmError
from ldm.pipelines.control import control_image, control_infotext
from ldm.pipelines.preprocess import PREPROCESSORS, fitted, preprocess
from ldm.pipelines.request import Control, GenerationRequest
from ldm_cli.main import main


def picture(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    """A fixed photo-like picture: gradients, a disc, a bar, noise (every colour level occurs; weak edges near the
    border, where canny's padding shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([x * 255 / (w - 1), y * 255 / (h - 1), (x + y) * 127 / (w + h)], -1) + rng.normal(0, 20, (h, w, 3))
    image[(x - w * 0.45) ** 2 + (y - h * 0.55) ** 2 < (min(h, w) / 4) ** 2] = (240, 40, 30)
    image[h // 5:h // 5 + 3, w // 6:w - w // 6] = 20
    return image.clip(0, 255).astype(np.uint8)


def segments(h: int = 48, w: int = 40) -> np.ndarray:
    """Five flat colours (a segmentation map)."""
    y, x = np.mgrid[0:h, 0:w]
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [200, 200, 50]], np.uint8)
    return palette[(x * 3 // w + (y * 7 // h) % 2 + (x > y)) % 5]


def blocks(h: int = 48, w: int = 40) -> np.ndarray:
    """Black and white shapes several pixels thick (a binary map, not edges)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.repeat(((((x // 7) + (y // 9)) % 2 == 0) * 255).astype(np.uint8)[..., None], 3, axis=2)


def edges(h: int = 48, w: int = 40) -> np.ndarray:
    """One-pixel white lines on black (a canny map)."""
    return cv2.cvtColor(cv2.Canny(cv2.resize(picture(h, w), (w, h)), 60, 120), cv2.COLOR_GRAY2RGB)


# ---- sd-webui-controlnet's code (56cec5b), written out as the rule ---------------------------------------------
# scripts/utils.py

def pad64(x):
    return int(np.ceil(float(x) / 64.0) * 64 - x)


def resize_image_with_pad(img, resolution):
    H_raw, W_raw, _ = img.shape
    k = float(resolution) / float(min(H_raw, W_raw))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    H_target = int(np.round(float(H_raw) * k))
    W_target = int(np.round(float(W_raw) * k))
    img = cv2.resize(img, (W_target, H_target), interpolation=interpolation)
    H_pad, W_pad = pad64(H_target), pad64(W_target)
    img_padded = np.pad(img, [[0, H_pad], [0, W_pad], [0, 0]], mode="edge")

    def remove_pad(x):
        return np.ascontiguousarray(x[:H_target, :W_target].copy()).copy()

    return np.ascontiguousarray(img_padded.copy()).copy(), remove_pad


# scripts/preprocessor/model_free_preprocessors.py (canny, invert, blur_gaussian, shuffle) and
# scripts/preprocessor/legacy/processor.py (threshold, tile_resample)

def a1111_canny(input_image, resolution=512, slider_1=100, slider_2=200):
    input_image, remove_pad = resize_image_with_pad(input_image, resolution)
    canny_image = cv2.cvtColor(cv2.Canny(input_image, int(slider_1), int(slider_2)), cv2.COLOR_GRAY2RGB)
    return remove_pad(canny_image)


def a1111_invert(input_image):
    return 255 - input_image


def a1111_threshold(img, res=512, thr_a=127):
    img, remove_pad = resize_image_with_pad(img, res)
    result = np.zeros_like(img, dtype=np.uint8)
    result[np.min(img, axis=2) > thr_a] = 255
    return remove_pad(result)


def a1111_tile_resample(img, thr_a=1.0):
    if thr_a < 1.1:
        return img
    H, W, C = img.shape
    H = int(float(H) / float(thr_a))
    W = int(float(W) / float(thr_a))
    return cv2.resize(img, (W, H), interpolation=cv2.INTER_AREA)


def a1111_blur_gaussian(input_image, resolution=512, slider_1=9.0):
    img, remove_pad = resize_image_with_pad(input_image, resolution)
    img = remove_pad(img)
    return cv2.GaussianBlur(img, (0, 0), float(slider_1))


def make_noise_disk(H, W, C, F):  # annotator/util.py
    noise = np.random.uniform(low=0, high=1, size=((H // F) + 2, (W // F) + 2, C))
    noise = cv2.resize(noise, (W + 2 * F, H + 2 * F), interpolation=cv2.INTER_CUBIC)
    noise = noise[F: F + H, F: F + W]
    noise -= np.min(noise)
    noise /= np.max(noise)
    if C == 1:
        noise = noise[:, :, None]
    return noise


def a1111_shuffle(input_image, seed):
    """`set_numpy_seed(p)` (scripts/controlnet.py) for a run of seed `seed` with A1111's default subseed −1
    (`tmp_subseed = p.all_seeds[0]`), then PreprocessorShuffle at its fixed resolution 512 and ContentShuffleDetector
    (annotator/shuffle)."""
    state = np.random.get_state()
    try:
        tmp_seed, tmp_subseed = seed, seed
        np.random.seed((tmp_seed + tmp_subseed) & 0xFFFFFFFF)
        img, remove_pad = resize_image_with_pad(input_image, 512)
        img = remove_pad(img)
        H, W, C = img.shape
        x = make_noise_disk(H, W, 1, 256) * float(W - 1)
        y = make_noise_disk(H, W, 1, 256) * float(H - 1)
        flow = np.concatenate([x, y], axis=2).astype(np.float32)
        return cv2.remap(img, flow, None, cv2.INTER_LINEAR)
    finally:
        np.random.set_state(state)


# scripts/lvminthin.py

lvmin_kernels_raw = [np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], dtype=np.int32),
                     np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], dtype=np.int32)]
lvmin_kernels = [np.rot90(x, k=k, axes=(0, 1)) for k in range(4) for x in lvmin_kernels_raw]
lvmin_prunings_raw = [np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], dtype=np.int32),
                      np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], dtype=np.int32)]
lvmin_prunings = [np.rot90(x, k=k, axes=(0, 1)) for k in range(4) for x in lvmin_prunings_raw]


def remove_pattern(x, kernel):
    objects = cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel)
    objects = np.where(objects > 127)
    x[objects] = 0
    return x, objects[0].shape[0] > 0


def thin_one_time(x, kernels):
    y = x
    is_done = True
    for k in kernels:
        y, has_update = remove_pattern(y, k)
        if has_update:
            is_done = False
    return y, is_done


def lvmin_thin(x, prunings=True):
    y = x
    for _ in range(32):
        y, is_done = thin_one_time(y, lvmin_kernels)
        if is_done:
            break
    if prunings:
        y, _ = thin_one_time(y, lvmin_prunings)
    return y


def nake_nms(x):
    f1 = np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8)
    f2 = np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8)
    f3 = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8)
    f4 = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8)
    y = np.zeros_like(x)
    for f in [f1, f2, f3, f4]:
        np.putmask(y, cv2.dilate(x, kernel=f) == x, x)
    return y


# scripts/controlnet.py, Script.detectmap_proc (the inpaint branches left out: these maps have no alpha)

def high_quality_resize(x, size, seen):
    if x.shape[0] != size[1] or x.shape[1] != size[0]:
        new_size_is_smaller = (size[0] * size[1]) < (x.shape[0] * x.shape[1])
        new_size_is_bigger = (size[0] * size[1]) > (x.shape[0] * x.shape[1])
        unique_color_count = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))  # get_unique_axis0
        is_one_pixel_edge = False
        is_binary = False
        if unique_color_count == 2:
            is_binary = np.min(x) < 16 and np.max(x) > 240
            if is_binary:
                xc = x
                xc = cv2.erode(xc, np.ones(shape=(3, 3), dtype=np.uint8), iterations=1)
                xc = cv2.dilate(xc, np.ones(shape=(3, 3), dtype=np.uint8), iterations=1)
                one_pixel_edge_count = np.where(xc < x)[0].shape[0]
                all_edge_count = np.where(x > 127)[0].shape[0]
                is_one_pixel_edge = one_pixel_edge_count * 2 > all_edge_count
        if 2 < unique_color_count < 200:
            interpolation = cv2.INTER_NEAREST
        elif new_size_is_smaller:
            interpolation = cv2.INTER_AREA
        else:
            interpolation = cv2.INTER_CUBIC
        y = cv2.resize(x, size, interpolation=interpolation)
        if is_binary:
            y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
            if is_one_pixel_edge:
                y = nake_nms(y)
                _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
                y = lvmin_thin(y, prunings=new_size_is_bigger)
            else:
                _, y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
            y = np.stack([y] * 3, axis=2)
        seen.add({cv2.INTER_NEAREST: "nearest", cv2.INTER_AREA: "area", cv2.INTER_CUBIC: "cubic"}[interpolation]
                 + (" binary" if is_binary else "") + (" one-pixel" if is_one_pixel_edge else "")
                 + (" pruned" if is_one_pixel_edge and new_size_is_bigger else ""))
    else:
        y = x
    return y


def detectmap_proc(detected_map, resize_mode, h, w, seen):
    old_h, old_w, _ = detected_map.shape
    old_w = float(old_w)
    old_h = float(old_h)
    k0 = float(h) / old_h
    k1 = float(w) / old_w

    def safeint(x):
        return int(np.round(x))

    if resize_mode == "Resize and Fill":
        k = min(k0, k1)
        borders = np.concatenate([detected_map[0, :, :], detected_map[-1, :, :], detected_map[:, 0, :],
                                  detected_map[:, -1, :]], axis=0)
        high_quality_border_color = np.median(borders, axis=0).astype(detected_map.dtype)
        high_quality_background = np.tile(high_quality_border_color[None, None], [h, w, 1])
        detected_map = high_quality_resize(detected_map, (safeint(old_w * k), safeint(old_h * k)), seen)
        new_h, new_w, _ = detected_map.shape
        pad_h = max(0, (h - new_h) // 2)
        pad_w = max(0, (w - new_w) // 2)
        high_quality_background[pad_h:pad_h + new_h, pad_w:pad_w + new_w] = detected_map
        return high_quality_background
    k = max(k0, k1)  # "Crop and Resize"
    detected_map = high_quality_resize(detected_map, (safeint(old_w * k), safeint(old_h * k)), seen)
    new_h, new_w, _ = detected_map.shape
    pad_h = max(0, (new_h - h) // 2)
    pad_w = max(0, (new_w - w) // 2)
    return detected_map[pad_h:pad_h + h, pad_w:pad_w + w]


def get_pytorch_control(x):
    return torch.from_numpy(x).float().div(255.0).permute(2, 0, 1)[None]


# ---- the preprocessors ---------------------------------------------------------------------------------------

def assert_equal(actual: np.ndarray, expected: np.ndarray):
    assert actual.dtype == expected.dtype == np.uint8 and actual.shape == expected.shape
    assert np.array_equal(actual, expected), f"{np.count_nonzero(actual != expected)} values differ"


@pytest.mark.parametrize("low, high, resolution", [(100, 200, 512), (50, 150, 64), (30, 90, 333), (200, 100, 48)])
def test_canny_is_cv2_canny_after_a1111s_padded_resize(low, high, resolution):
    image = picture()
    expected = a1111_canny(image, resolution, low, high)
    actual = preprocess(image, "canny", low, high, resolution)
    assert_equal(actual, expected)
    assert 0 < np.count_nonzero(expected) < expected.size / 2  # edges, not an empty or a full map


def test_canny_defaults_are_a1111s():
    assert_equal(preprocess(picture(), "canny"), a1111_canny(picture()))


@pytest.mark.parametrize("name, params, reference", [
    ("invert", {}, lambda im: a1111_invert(im)),
    ("threshold", {}, lambda im: a1111_threshold(im)),
    ("threshold", {"a": 90.5, "resolution": 100}, lambda im: a1111_threshold(im, 100, 90.5)),
    ("tile", {}, lambda im: a1111_tile_resample(im)),
    ("tile", {"a": 1.05}, lambda im: a1111_tile_resample(im, 1.05)),
    ("tile", {"a": 2.5}, lambda im: a1111_tile_resample(im, 2.5)),
    ("blur", {}, lambda im: a1111_blur_gaussian(im)),
    ("blur", {"a": 1.5, "resolution": 80}, lambda im: a1111_blur_gaussian(im, 80, 1.5)),
])
def test_model_free_preprocessors_follow_a1111s_rule(name, params, reference):
    image = picture()
    expected = reference(image)
    assert_equal(preprocess(image, name, **params), expected)
    unchanged = name == "tile" and params.get("a", 1.0) < 1.1  # A1111's tile_resample leaves it below a rate of 1.1
    assert np.array_equal(expected, image) == unchanged


@pytest.mark.parametrize("seed", [0, 3, 2**31 + 5, 2**64 - 1])
def test_shuffle_is_a1111s_flow_field_of_the_runs_seed(seed):
    image = picture()
    expected = a1111_shuffle(image, seed)
    assert_equal(preprocess(image, "shuffle", seed=seed), expected)
    assert expected.shape == (614, 512, 3)  # at 512, whatever the processor resolution
    assert not np.array_equal(expected, a1111_shuffle(image, seed + 1))  # the seed moves it


def test_shuffle_needs_the_seed():
    with pytest.raises(ValueError, match="seed"):
        preprocess(picture(), "shuffle")


# ---- the resize modes ------------------------------------------------------------------------------------------

SIZES = [((48, 40), (64, 64)), ((48, 40), (32, 16)), ((30, 50), (40, 56)), ((40, 40), (24, 24)), ((30, 50), (50, 30))]


@pytest.mark.parametrize("mode, label", [("crop-and-resize", "Crop and Resize"),
                                         ("resize-and-fill", "Resize and Fill")])
def test_resize_modes_follow_detectmap_proc(mode, label):
    """Every kind of map (photo, segmentation, black-and-white shapes, one-pixel edges) from and to sizes of either
    orientation, up and down: equal to `detectmap_proc`, and every branch of `high_quality_resize` taken."""
    seen = set()
    for make in (picture, segments, blocks, edges):
        for (h, w), (width, height) in SIZES:
            image = make(h, w)
            expected = detectmap_proc(image, label, height, width, seen)
            actual = fitted(image, mode, width, height)
            assert actual.shape == (height, width, 3)
            assert_equal(actual, expected)
    assert {"nearest", "area", "cubic", "area binary", "cubic binary", "area binary one-pixel",
            "cubic binary one-pixel pruned"} <= seen, seen


def test_resize_and_fill_pads_with_the_borders_median():
    image = np.full((20, 40, 3), 200, np.uint8)
    image[0, :10] = 10  # a few dark border pixels do not move the median
    out = fitted(image, "resize-and-fill", 40, 40)
    assert (out[:10] == 200).all() and (out[30:] == 200).all()
    assert_equal(out, detectmap_proc(image, "Resize and Fill", 40, 40, set()))


def test_control_image_preprocesses_then_fits():
    """`control_image` of a unit: its preprocessor's map, fitted by its mode, in [0, 1] as the ControlNet reads it
    (`get_pytorch_control`); just-resize is diffusers' Lanczos stretch, the same as an image given alone."""
    image = Image.fromarray(picture())
    unit = Control("net", image, preprocess="canny", resize="resize-and-fill", threshold_a=60, processor_res=96)
    canny = a1111_canny(picture(), 96, 60, 200)
    expected = get_pytorch_control(detectmap_proc(canny, "Resize and Fill", 64, 56, set()))
    assert torch.equal(control_image(unit, 56, 64), expected)
    stretched = np.asarray(image.resize((56, 64), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    assert torch.equal(control_image(Control("net", image), 56, 64), torch.from_numpy(stretched).permute(2, 0, 1)[None])
    assert torch.equal(control_image(image, 56, 64), control_image(Control("net", image), 56, 64))
    shuffled = Control("net", image, preprocess="shuffle", resize="crop-and-resize")
    expected = get_pytorch_control(detectmap_proc(a1111_shuffle(picture(), 7), "Crop and Resize", 64, 56, set()))
    assert torch.equal(control_image(shuffled, 56, 64, seed=7), expected)


def test_every_name_users_type_has_its_preprocessor():
    assert set(PREPROCESSORS) == set(CONTROL_PREPROCESSORS)
    assert set(CONTROL_PREPROCESSOR_PARAMS) | set(CONTROL_RESOLUTION_PREPROCESSORS) <= set(PREPROCESSORS)


# ---- a unit's checks and infotext ------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    ({"resize": "fit"}, "unknown resize mode 'fit' (use just-resize, crop-and-resize, resize-and-fill)"),
    ({"preprocess": "depth"}, "unknown preprocessor 'depth' (use canny, invert, threshold, tile, blur, shuffle"),
    ({"preprocess": "canny", "threshold_a": 0}, "canny's threshold A (low threshold) must be a whole number from 1 "
                                                "to 255, got 0"),
    ({"preprocess": "canny", "threshold_b": 256}, "canny's threshold B (high threshold) must be a whole number"),
    ({"preprocess": "canny", "threshold_a": 100.5}, "must be a whole number from 1 to 255, got 100.5"),
    ({"preprocess": "threshold", "threshold_a": -1}, "threshold's threshold A (binarization threshold) must be a "
                                                     "number from 0 to 255"),
    ({"preprocess": "tile", "threshold_a": 9}, "tile's threshold A (down-sampling rate) must be a number from 1 to 8"),
    ({"preprocess": "blur", "threshold_a": 0}, "blur's threshold A (sigma) must be a number from 0.01 to 64"),
    ({"preprocess": "canny", "processor_res": 32}, "canny's processor resolution must be a whole number from 64 to "
                                                   "2048, got 32"),
])
def test_bad_units_are_refused(settings, message):
    request = GenerationRequest("a", controls=[Control("net", Image.new("RGB", (8, 8)), **settings)])
    with pytest.raises(LdmError, match="^ControlNet unit 0: ") as error:
        request.check()
    assert message in str(error.value)


def test_parameters_a_preprocessor_has_not_are_not_read():
    """As in sd-webui-controlnet: invert has no slider, so a unit's threshold A (given for every unit) is ignored."""
    GenerationRequest("a", controls=[Control("net", Image.new("RGB", (8, 8)), preprocess="invert", threshold_a=999,
                                             processor_res=1)]).check()


def test_without_opencv_a_preprocessor_says_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cv2" else real(name, *a))
    for settings, what in (({"preprocess": "canny"}, "canny"), ({"resize": "crop-and-resize"}, "crop-and-resize")):
        request = GenerationRequest("a", controls=[Control("net", Image.new("RGB", (8, 8)), **settings)])
        with pytest.raises(LdmError, match=f"{what} needs OpenCV, .*pip install 'ldm\\[control\\]'"):
            request.check()
    with pytest.raises(LdmError, match="canny needs OpenCV"):
        preprocess(picture(), "canny")


def test_infotext_names_the_module_resize_mode_and_parameters():
    image = Image.new("RGB", (8, 8))
    assert control_infotext(Control("a/net", image)) == (
        "Module: none, Model: net, Weight: 1.0, Resize Mode: Just Resize, Guidance Start: 0.0, Guidance End: 1.0, "
        "Control Mode: Balanced")
    assert control_infotext(Control("net", image, weight=0.5, resize="crop-and-resize", preprocess="canny",
                                    threshold_b=150.0)) == (
        "Module: canny, Model: net, Weight: 0.5, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, "
        "Threshold B: 150.0, Guidance Start: 0.0, Guidance End: 1.0, Control Mode: Balanced")
    assert control_infotext(Control("net", image, resize="resize-and-fill", preprocess="tile", threshold_a=2.0,
                                    mode="prompt")) == (
        "Module: tile_resample, Model: net, Weight: 1.0, Resize Mode: Resize and Fill, Threshold A: 2.0, "
        "Guidance Start: 0.0, Guidance End: 1.0, Control Mode: My prompt is more important")


# ---- the command line ------------------------------------------------------------------------------------------

@pytest.fixture
def picture_png(tmp_path):
    path = tmp_path / "picture.png"
    Image.fromarray(picture()).save(path)
    return path


@pytest.mark.parametrize("args, reference", [
    (["canny"], lambda im: a1111_canny(im)),
    (["canny", "--low", "50", "--high", "150", "--resolution", "64"], lambda im: a1111_canny(im, 64, 50, 150)),
    (["invert"], lambda im: a1111_invert(im)),
    (["threshold", "--value", "100"], lambda im: a1111_threshold(im, 512, 100)),
    (["tile", "--rate", "2"], lambda im: a1111_tile_resample(im, 2.0)),
    (["blur", "--sigma", "2", "--resolution", "64"], lambda im: a1111_blur_gaussian(im, 64, 2.0)),
    (["shuffle", "--seed", "11"], lambda im: a1111_shuffle(im, 11)),
])
def test_preprocess_command_writes_the_control_image(picture_png, tmp_path, capsys, args, reference):
    out = tmp_path / "out.png"
    assert main(["preprocess", args[0], str(picture_png), "-o", str(out), *args[1:]]) == 0
    expected = reference(picture())
    assert_equal(np.asarray(Image.open(out)), expected)
    printed = capsys.readouterr().out
    assert printed.startswith(f"{out} ({expected.shape[1]}x{expected.shape[0]})")
    assert ("seed 11" in printed) == (args[0] == "shuffle")


@pytest.mark.parametrize("args, message", [
    (["depth", "P"], "invalid choice: 'depth'"),
    (["canny", "P", "--low", "0"], "canny's --low (low threshold) must be a whole number from 1 to 255, got 0"),
    (["canny", "P", "--high", "300"], "canny's --high (high threshold) must be a whole number from 1 to 255, got 300"),
    (["threshold", "P", "--value", "256"], "threshold's --value (binarization threshold) must be a number from 0 "),
    (["canny", "P", "--resolution", "4000"], "--resolution (processor resolution) must be a whole number from 64"),
    (["canny", "P", "--sigma", "2"], "--sigma is blur's; canny takes --low, --high"),
    (["invert", "P", "--resolution", "256"], "--resolution applies to canny, threshold, blur; invert works at"),
    (["canny", "P", "--seed", "1"], "--seed applies to shuffle, not to canny"),
    (["canny", "NOIMAGE.png"], "image NOIMAGE.png: no such file"),
    (["canny", "NOTANIMAGE"], "not a readable image"),
])
def test_preprocess_command_mistakes_are_one_line(picture_png, tmp_path, capsys, args, message):
    (tmp_path / "not-an-image.png").write_text("text")
    names = {"P": str(picture_png), "NOTANIMAGE": str(tmp_path / "not-an-image.png")}
    try:
        code = main(["preprocess", *[names.get(a, a) for a in args], "-o", str(tmp_path / "x.png")])
    except SystemExit as e:  # argparse's choices
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert not (tmp_path / "x.png").exists()


PROMPT = "a house by a lake, line art"


@pytest.fixture(scope="module")
def controlnet(sd1_folder, tmp_path_factory):
    return make_controlnet(sd1_folder, tmp_path_factory.mktemp("control-preprocess") / "control", seed=1)


def generate(sd1_folder, controlnet, image, out, *options) -> np.ndarray:
    assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "3", "--seed", "5", "--sampler", "euler",
                 "--controlnet", str(controlnet), "--control-image", str(image), *options, "-o", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("preprocessor, made_with, resize", [
    (["--control-preprocess", "canny", "--control-threshold-a", "50", "--control-threshold-b", "150",
      "--control-processor-res", "64"], ["canny", "--low", "50", "--high", "150", "--resolution", "64"],
     "resize-and-fill"),
    (["--control-preprocess", "shuffle"], ["shuffle", "--seed", "5"], "just-resize"),
])
def test_generate_with_a_preprocessor_is_generating_with_its_map(sd1_folder, controlnet, picture_png, tmp_path,
                                                                preprocessor, made_with, resize):
    """`--control-preprocess` (with the run's seed for shuffle) gives the image that the control image made by `ldm
    preprocess` gives, pixel for pixel; the picture itself, unprocessed, gives another."""
    resize_option = ["--control-resize", resize]
    actual = generate(sd1_folder, controlnet, picture_png, tmp_path / "a.png", *preprocessor, *resize_option)
    made = tmp_path / "map.png"
    assert main(["preprocess", made_with[0], str(picture_png), "-o", str(made), *made_with[1:]]) == 0
    expected = generate(sd1_folder, controlnet, made, tmp_path / "b.png", *resize_option)
    assert np.array_equal(actual, expected)
    plain = generate(sd1_folder, controlnet, picture_png, tmp_path / "c.png", *resize_option)
    assert np.abs(actual.astype(int) - plain).max() > 10
    params = Image.open(tmp_path / "a.png").text["parameters"]
    module = {"canny": "canny", "shuffle": "shuffle"}[made_with[0]]
    label = {"resize-and-fill": "Resize and Fill", "just-resize": "Just Resize"}[resize]
    assert f'ControlNet 0: "Module: {module}, Model: control, Weight: 1.0, Resize Mode: {label}, ' in params


@pytest.mark.parametrize("args, message", [
    (["--control-preprocess", "depth"], "invalid choice: 'depth'"),
    (["--control-resize", "fit"], "invalid choice: 'fit'"),
    (["--control-preprocess", "canny", "--control-threshold-a", "300"],
     "ControlNet unit 0: canny's threshold A (low threshold) must be a whole number from 1 to 255, got 300.0"),
    (["--control-preprocess", "canny", "--control-processor-res", "8"], "processor resolution must be a whole number"),
    (["--control-preprocess", "canny", "--control-preprocess", "invert"],
     "--control-preprocess was given 2 times for 1 ControlNet units"),
])
def test_generate_preprocess_mistakes_are_one_line(sd1_folder, controlnet, picture_png, tmp_path, capsys, args,
                                                   message):
    argv = ["generate", PROMPT, "--model", str(sd1_folder), "--steps", "1", "-o", str(tmp_path / "x.png"),
            "--controlnet", str(controlnet), "--control-image", str(picture_png), *args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's choices
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
