"""ControlNet preprocessors that need no model, and the resize modes that fit a control image to the output: the
maps sd-webui-controlnet makes from an ordinary picture (its edges, its negative, …) and the way it fits them.

Reproduces Mikubill/sd-webui-controlnet at 56cec5b (v1.1.455): canny, invert, blur_gaussian and shuffle
(scripts/preprocessor/model_free_preprocessors.py), threshold and tile_resample (scripts/preprocessor/legacy/
processor.py), those with a resolution after `resize_image_with_pad` (scripts/utils.py: the short side scaled to the
processor resolution, cubic up and area down, edge-padded to a multiple of 64, the padding cut off again); the
shuffle's flow field (annotator/shuffle, annotator/util.py `make_noise_disk`) drawn from numpy's legacy generator
seeded as `set_numpy_seed` (scripts/controlnet.py) seeds it; "Crop and Resize" and "Resize and Fill" as
`Script.detectmap_proc` (scripts/controlnet.py) fits a map, resampled by its `high_quality_resize` (with
scripts/lvminthin.py's thinning of one-pixel edges). OpenCV does the pixel work there and here: it is the `control`
extra, imported on first use. Images are (H, W, 3) uint8 arrays throughout.
"""

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ldm.choices import CONTROL_PREPROCESSOR_PARAMS, CONTROL_PROCESSOR_RES, CONTROL_RESOLUTION_PREPROCESSORS
from ldm.errors import LdmError

SHUFFLE_RESOLUTION = 512  # its resolution slider is hidden, and a unit's value falls outside that slider's range (0–1)
SHUFFLE_CELL = 256  # `ContentShuffleDetector`'s f: the flow field's noise has one value per 256 px


def opencv_missing(what: str) -> str | None:
    """The one line that says how to install OpenCV, when `what` needs it and it is not installed; else None."""
    if importlib.util.find_spec("cv2") is None:
        return (f"{what} needs OpenCV, which ldm's `control` extra installs: pip install 'ldm[control]' "
                "(or pip install opencv-python-headless)")
    return None


def opencv(what: str):
    """cv2, or an LdmError that says how to install it."""
    message = opencv_missing(what)
    if message is not None:
        raise LdmError(message)
    import cv2

    return cv2


@dataclass(frozen=True)
class Param:
    """One of a preprocessor's parameters, as sd-webui-controlnet's slider has it (`ldm.choices`)."""

    option: str  # `ldm preprocess`'s option (--low)
    what: str  # in messages ("low threshold")
    default: float
    low: float
    high: float
    whole: bool

    def accepts(self, value) -> bool:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return number and self.low <= value <= self.high and (not self.whole or float(value).is_integer())

    @property
    def rule(self) -> str:
        return f"{'a whole number' if self.whole else 'a number'} from {self.low:g} to {self.high:g}"


RESOLUTION = Param("resolution", "processor resolution", *CONTROL_PROCESSOR_RES, whole=True)


def with_pad(image: np.ndarray, resolution: int, cv2) -> tuple[np.ndarray, tuple[int, int]]:
    """sd-webui-controlnet's `resize_image_with_pad`: the short side scaled to `resolution` (cubic up, area down),
    then edge-padded to a multiple of 64; (the padded image, the size before padding)."""
    h, w = image.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = int(np.round(float(h) * k)), int(np.round(float(w) * k))
    image = cv2.resize(image, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    return np.pad(image, [[0, -th % 64], [0, -tw % 64], [0, 0]], mode="edge"), (th, tw)


def canny(image: np.ndarray, low, high, resolution: int, seed) -> np.ndarray:
    """`cv2.Canny(low, high)` of the padded image at the processor resolution, the padding cut off."""
    cv2 = opencv("canny")
    padded, (h, w) = with_pad(image, resolution, cv2)
    edges = cv2.cvtColor(cv2.Canny(padded, int(low), int(high)), cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(edges[:h, :w])


def invert(image: np.ndarray, a, b, resolution, seed) -> np.ndarray:
    """255 − the image, at its own size (line art on white made the white lines on black ControlNets know)."""
    return 255 - image


def threshold(image: np.ndarray, value, b, resolution: int, seed) -> np.ndarray:
    """White where every channel is above `value`, black elsewhere, at the processor resolution."""
    padded, (h, w) = with_pad(image, resolution, opencv("threshold"))
    above = padded[:h, :w].min(axis=2, keepdims=True) > value
    return np.repeat(np.where(above, 255, 0).astype(np.uint8), 3, axis=2)


def tile(image: np.ndarray, rate, b, resolution, seed) -> np.ndarray:
    """`tile_resample`: the image shrunk by `rate` (area), unchanged below 1.1; the resize mode brings it back up."""
    if rate < 1.1:
        return image
    cv2 = opencv("tile")
    h, w = image.shape[:2]
    return cv2.resize(image, (int(float(w) / float(rate)), int(float(h) / float(rate))), interpolation=cv2.INTER_AREA)


def blur(image: np.ndarray, sigma, b, resolution: int, seed) -> np.ndarray:
    """`blur_gaussian`: a Gaussian blur of σ `sigma` at the processor resolution (after the padding is cut off)."""
    cv2 = opencv("blur")
    padded, (h, w) = with_pad(image, resolution, cv2)
    return cv2.GaussianBlur(np.ascontiguousarray(padded[:h, :w]), (0, 0), float(sigma))


def shuffle_seed(seed: int) -> int:
    """The numpy seed of a run's shuffle: `set_numpy_seed`'s (seed + subseed) mod 2³², where a subseed of −1
    (A1111's default; ldm has none) counts as the first seed."""
    return (2 * seed) & 0xFFFFFFFF


def noise_disk(rng: np.random.RandomState, h: int, w: int, cell: int, cv2) -> np.ndarray:
    """`make_noise_disk` with one channel: uniform noise on a grid of `cell`-px cells, cubic-interpolated to
    (h, w, 1), stretched to [0, 1]."""
    noise = rng.uniform(low=0, high=1, size=(h // cell + 2, w // cell + 2, 1))
    noise = cv2.resize(noise, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)[cell:cell + h, cell:cell + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[:, :, None]


def shuffle(image: np.ndarray, a, b, resolution, seed: int | None) -> np.ndarray:
    """`ContentShuffleDetector` at 512: each pixel taken from where a smooth random flow field points (x's field
    drawn first, then y's), bilinearly; the field from the run's seed."""
    if seed is None:
        raise ValueError("the shuffle preprocessor draws its flow field from the run's seed: pass seed=")
    cv2 = opencv("shuffle")
    padded, (h, w) = with_pad(image, SHUFFLE_RESOLUTION, cv2)
    image = np.ascontiguousarray(padded[:h, :w])
    rng = np.random.RandomState(shuffle_seed(seed))
    x = noise_disk(rng, h, w, SHUFFLE_CELL, cv2) * float(w - 1)
    y = noise_disk(rng, h, w, SHUFFLE_CELL, cv2) * float(h - 1)
    return cv2.remap(image, np.concatenate([x, y], axis=2).astype(np.float32), None, cv2.INTER_LINEAR)


@dataclass(frozen=True)
class Preprocessor:
    """A preprocessor: its function `(image, a, b, resolution, seed) → image`, its parameters (A1111's threshold A
    and B, in order) and whether it works at the processor resolution."""

    run: Callable[..., np.ndarray]
    params: tuple[Param, ...] = ()
    resolution: bool = False

    def param(self, which: int) -> Param | None:
        return self.params[which] if which < len(self.params) else None


PREPROCESSORS = {name: Preprocessor(run, tuple(Param(*p) for p in CONTROL_PREPROCESSOR_PARAMS.get(name, ())),
                                    name in CONTROL_RESOLUTION_PREPROCESSORS)
                 for name, run in {"canny": canny, "invert": invert, "threshold": threshold, "tile": tile, "blur": blur,
                                   "shuffle": shuffle}.items()}


def preprocess(image: np.ndarray, name: str, a=None, b=None, resolution: int | None = None,
               seed: int | None = None) -> np.ndarray:
    """The control image preprocessor `name` makes of an RGB image: (H, W, 3) uint8 → (H', W', 3) uint8. `a`, `b`:
    its parameters (None: their defaults), `resolution`: the processor resolution where it has one (None: 512),
    `seed`: the run's (shuffle draws from it)."""
    p = PREPROCESSORS[name]
    a, b = (v if v is not None or q is None else q.default for v, q in ((a, p.param(0)), (b, p.param(1))))
    return p.run(image, a, b, resolution or RESOLUTION.default, seed)


def pixel_perfect_resolution(height: int, width: int, target_height: int, target_width: int, mode: str) -> int:
    """sd-webui-controlnet's "Pixel Perfect" (`pixel_perfect_resolution`, internal_controlnet/external_code.py and
    scripts/utils.py at v1.1.455; scripts/controlnet.py sets a unit's `processor_res` to it, for the first pass's
    size): the processor resolution at which an image of height × width comes out at the output's scale. The
    short side × the larger of the two scale factors (target / image, per side), the smaller for "resize-and-fill"
    (the whole image fits inside), rounded half to even (`np.round`)."""
    ky, kx = float(target_height) / float(height), float(target_width) / float(width)
    k = min(ky, kx) if mode == "resize-and-fill" else max(ky, kx)
    return int(np.round(k * float(min(height, width))))


# the resize modes sd-webui-controlnet adds to diffusers' stretch ("Just Resize")

NMS_LINES = [np.array(k, np.uint8) for k in ([[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
                                              [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]


def nake_nms(x: np.ndarray, cv2) -> np.ndarray:
    """lvminthin.py's `nake_nms`: each pixel kept where it is the maximum of its horizontal, vertical or one of its
    diagonal neighbourhoods, else 0."""
    y = np.zeros_like(x)
    for line in NMS_LINES:
        np.putmask(y, cv2.dilate(x, kernel=line) == x, x)
    return y


def _rotations(*kernels: list[list[int]]) -> list[np.ndarray]:
    """Each kernel turned by 0, 90, 180 and 270 degrees, in lvminthin.py's order (by turn, then by kernel)."""
    return [np.rot90(np.array(k, np.int32), k=turn, axes=(0, 1)) for turn in range(4) for k in kernels]


THINNING = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
PRUNING = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])


def _thin_once(x: np.ndarray, kernels: list[np.ndarray], cv2) -> bool:
    """Clear, in place, every pixel each hit-or-miss kernel matches (in turn); whether none matched."""
    done = True
    for kernel in kernels:
        hits = np.where(cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127)
        x[hits] = 0
        done = done and hits[0].shape[0] == 0
    return done


def thin(x: np.ndarray, prune: bool, cv2) -> np.ndarray:
    """lvminthin.py's `lvmin_thin`: a binary map thinned to one-pixel lines (at most 32 passes), its spurs pruned
    once when `prune`."""
    for _ in range(32):
        if _thin_once(x, THINNING, cv2):
            break
    if prune:
        _thin_once(x, PRUNING, cv2)
    return x


def high_quality_resize(x: np.ndarray, width: int, height: int, cv2) -> np.ndarray:
    """`high_quality_resize`: nearest for maps of 3 to 199 colours (segmentations), else area down and cubic up;
    a black-and-white map (2 colours, below 16 and above 240) comes back black and white: its resampled mean
    binarized by Otsu's threshold, and, where its lines are one pixel wide, thinned back to one pixel."""
    if x.shape[:2] == (height, width):
        return x
    pixels = width * height
    smaller, bigger = pixels < x.shape[0] * x.shape[1], pixels > x.shape[0] * x.shape[1]
    colours = len(np.unique(x.reshape(-1, x.shape[2]), axis=0))
    binary = colours == 2 and np.min(x) < 16 and np.max(x) > 240
    one_pixel = False
    if binary:
        square = np.ones((3, 3), np.uint8)
        opened = cv2.dilate(cv2.erode(x, square, iterations=1), square, iterations=1)
        one_pixel = np.count_nonzero(opened < x) * 2 > np.count_nonzero(x > 127)
    interpolation = (cv2.INTER_NEAREST if 2 < colours < 200 else cv2.INTER_AREA if smaller else cv2.INTER_CUBIC)
    y = cv2.resize(x, (width, height), interpolation=interpolation)
    if not binary:
        return y
    y = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel:
        y = thin(cv2.threshold(nake_nms(y, cv2), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1], bigger, cv2)
    else:
        y = cv2.threshold(y, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]
    return np.stack([y] * 3, axis=2)


def fitted(image: np.ndarray, mode: str, width: int, height: int) -> np.ndarray:
    """`detectmap_proc`: "crop-and-resize" scales the image to cover width × height and keeps the centre;
    "resize-and-fill" scales it to fit inside and pads it, centred, with the median colour of its border pixels."""
    cv2 = opencv(f"the resize mode {mode}")
    h0, w0 = image.shape[:2]
    ky, kx = float(height) / float(h0), float(width) / float(w0)
    k = max(ky, kx) if mode == "crop-and-resize" else min(ky, kx)
    scaled = high_quality_resize(image, int(np.round(w0 * k)), int(np.round(h0 * k)), cv2)
    h, w = scaled.shape[:2]
    if mode == "crop-and-resize":
        top, left = max(0, (h - height) // 2), max(0, (w - width) // 2)
        return np.ascontiguousarray(scaled[top:top + height, left:left + width])
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    out = np.tile(np.median(border, axis=0).astype(image.dtype)[None, None], [height, width, 1])
    top, left = max(0, (height - h) // 2), max(0, (width - w) // 2)
    out[top:top + h, left:left + w] = scaled
    return out
