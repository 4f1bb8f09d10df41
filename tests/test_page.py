"""The page at `/` (ldm/serving/page.html) in a real headless Chromium, driven by Playwright, against a loopback
`ldm serve` on the tiny model: type a prompt and generate (the progress bar moves, the image appears in the gallery
with its infotext and a download link, and it is the pipeline's image), interrupt a long run (it ends early), drop
an image and paint a mask (the request reaches /sdapi/v1/img2img with that mask), run the hires fix on a batch of
two, pick a LoRA, see a server error in its own words, and find the settings again after a reload. A screenshot is
saved under the test's tmp dir.

Debian's `chromium` (no browser can be downloaded at run time, so not `playwright install`): `.ci/run` installs it.
Without it, or without the `playwright` package, these tests skip and say why."""

import base64
import io
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MAX_PIXEL_DIFF
from PIL import Image
from test_serve import Server

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.server import ServeConfig

sync_api = pytest.importorskip("playwright.sync_api", reason="the page tests need Playwright (pip install playwright)")
CHROMIUM = Path("/usr/bin/chromium")
PROMPT = "a lighthouse at night"
PAUSE_S = 0.04  # each denoising step of the served pipeline takes at least this long: runs long enough to watch
TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium)"),
    pytest.mark.usefixtures("one_thread"),
]


class Paced:
    """The tiny pipeline with each denoising step at least `pause` seconds long, so that a run lasts long enough
    for the page to show its progress and for a click to interrupt it; otherwise the pipeline itself."""

    def __init__(self, pipe, pause: float):
        self.pipe, self.pause = pipe, pause

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, request, callbacks=(), **options):
        return self.pipe(request, callbacks=[*callbacks, lambda event: time.sleep(self.pause)], **options)


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A weights folder with one LoRA file in it (only listed by the page, never loaded)."""
    weights = tmp_path_factory.mktemp("weights")
    (weights / "loras").mkdir()
    (weights / "loras" / "tiny-style.safetensors").write_bytes(b"")
    return weights


@pytest.fixture(scope="module")
def server(pipe, loras):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LDM_WEIGHTS", str(loras))
        s = Server(lambda: Paced(pipe, PAUSE_S), ServeConfig(queue_size=4))
        deadline = time.monotonic() + 30
        while s.request("GET", "/health")[0] != 200 and time.monotonic() < deadline:  # the model loads in the back
            time.sleep(0.02)
        yield s
        s.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    """The page opened afresh (its own localStorage), its lists loaded and its settings restored."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.wait_for_selector("body[data-ready=true]")
    yield page
    context.close()
    assert not errors, errors  # no uncaught script error


def fill_form(page, prompt: str = PROMPT, steps: int = 8, seed: int = 7, size: int = 64) -> None:
    page.fill("#prompt", prompt)
    page.fill("#steps", str(steps))
    page.fill("#width", str(size))
    page.fill("#height", str(size))
    page.fill("#seed", str(seed))
    page.select_option("#sampler", "Euler")


def progress_value(page) -> float:
    return page.eval_on_selector("#progress", "el => el.value")


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def png_of(data_url: str) -> Image.Image:
    assert data_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def test_generate_shows_progress_and_the_image(page, pipe):
    fill_form(page, steps=30, seed=7)
    page.fill("#negative_prompt", "fog")
    with page.expect_response("**/sdapi/v1/txt2img") as response:
        page.click("#generate")
        seen = []
        while not page.is_enabled("#generate"):  # the page polls /progress while the request runs
            seen.append(progress_value(page))
            time.sleep(0.05)
    assert response.value.status == 200
    assert any(0 < v < 1 for v in seen), seen  # the bar moved through the run
    assert seen == sorted(seen)
    assert progress_value(page) == 1 and page.text_content("#status").startswith("Done: 1 image")

    figure = page.locator("#gallery figure.result")
    assert figure.count() == 1
    infotext = figure.locator("pre.infotext").text_content()
    assert infotext.startswith(PROMPT) and "Negative prompt: fog" in infotext
    for part in ("Steps: 30", "Sampler: Euler", "CFG scale: 7", "Seed: 7", "Size: 64x64"):
        assert part in infotext, infotext
    link = figure.locator("a.download")
    assert link.get_attribute("download").endswith(".png") and link.text_content() == "Download PNG"
    image = png_of(link.get_attribute("href"))
    assert image.size == (64, 64) and image.info["parameters"] == infotext
    expected = pipe(PROMPT, negative_prompt="fog", seed=7, steps=30, guidance=7.0, width=64, height=64,
                    sampler="euler").images[0]
    assert np.abs(pixels(image) - pixels(expected)).max() <= MAX_PIXEL_DIFF

    page.reload()  # the settings are kept in localStorage; the gallery is what this page made
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#prompt") == PROMPT and page.input_value("#steps") == "30"
    assert page.input_value("#sampler") == "Euler" and page.input_value("#seed") == "7"
    assert page.locator("#gallery figure").count() == 0


def test_interrupt_ends_a_long_run(page):
    steps = 150  # ≥ 6 s at PAUSE_S a step
    fill_form(page, steps=steps, seed=-1)
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    start = time.monotonic()
    page.click("#generate")
    page.wait_for_function("/Step ([3-9]|\\d\\d+) of 150/.test(document.getElementById('progress-text').textContent)")
    # the live preview of the run (A1111's cheap approximation: the 64×64 image's 8×8 latent), shown scaled up
    page.wait_for_selector("#live-preview", state="visible")
    preview = png_of(page.get_attribute("#live-preview", "src"))
    assert preview.size == (8, 8)
    assert page.locator("#live-preview").bounding_box()["width"] > 8 * 10
    with page.expect_request("**/sdapi/v1/interrupt") as interrupt:
        page.click("#interrupt")
    assert interrupt.value.method == "POST"
    page.wait_for_function("!document.getElementById('generate').disabled")
    elapsed = time.monotonic() - start
    status = page.text_content("#status")
    assert status.startswith("Interrupted at step"), status
    stopped_at = int(status.split("step ")[1].split(" of")[0])
    assert stopped_at < steps and elapsed < steps * PAUSE_S, (status, elapsed)
    assert page.locator("#gallery figure.result").count() == 1  # the estimate it had reached, as A1111 answers
    assert page.is_disabled("#interrupt")


def test_img2img_with_a_painted_mask(page, pipe, tmp_path):
    fill_form(page, steps=4, seed=4)
    init = Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8))
    buffer = io.BytesIO()
    init.save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    # a file dropped on the drop zone, as a browser delivers one
    page.evaluate("""async (b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "init.png", {type: "image/png"}));
        document.getElementById("dropzone").dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }""", png)
    page.wait_for_selector("#mask-canvas", state="visible")
    page.wait_for_function("document.getElementById('mask-canvas').width === 64")
    assert "image to image" in page.text_content("#init-mode")
    # a horizontal stroke across the middle of the image, with the mouse
    page.fill("#brush-size", "24")  # display pixels: the canvas shows the 64-pixel image larger
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    for f in (0.35, 0.5, 0.65, 0.8):
        page.mouse.move(box["x"] + box["width"] * f, y)
    page.mouse.up()
    assert "inpainting the painted area" in page.text_content("#init-mode")
    page.fill("#denoising_strength", "0.6")

    with page.expect_request("**/sdapi/v1/img2img") as sent:
        page.click("#generate")
    body = sent.value.post_data_json
    assert body["init_images"] == [png] and body["denoising_strength"] == 0.6 and body["prompt"] == PROMPT
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["mask"]))).convert("L"))
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    assert mask[32, 16:48].min() == 255  # under the stroke: repainted
    assert mask[:20].max() == 0 and mask[44:].max() == 0 and mask[:, :6].max() == 0  # away from it: kept

    page.wait_for_function("!document.getElementById('generate').disabled")
    assert page.text_content("#error") == ""
    figure = page.locator("#gallery figure.result").first
    infotext = figure.locator("pre.infotext").text_content()
    assert "Denoising strength: 0.6" in infotext and "Seed: 4" in infotext
    expected = pipe(PROMPT, image=init, mask=Image.fromarray(mask), strength=0.6, seed=4, steps=4, guidance=7.0,
                    sampler="euler", width=64, height=64).images[0]  # what that request asks of the pipeline
    image = png_of(figure.locator("a.download").get_attribute("href"))
    assert np.abs(pixels(image) - pixels(expected)).max() <= MAX_PIXEL_DIFF
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot of the page: {shot}")
    assert shot.stat().st_size > 0


def test_lora_picker_and_server_errors(page):
    assert page.locator("#lora option").all_text_contents() == ["tiny-style"]
    page.fill("#prompt", "a lighthouse")
    page.click("#lora-insert")
    assert page.input_value("#prompt") == "a lighthouse <lora:tiny-style:1>"
    # a schedule its sampler does not take: the server's 422, in its own words
    fill_form(page, prompt="x", steps=2)
    page.select_option("#sampler", "Euler a")
    page.select_option("#scheduler", "karras")
    with page.expect_response("**/sdapi/v1/txt2img") as response:
        page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent !== ''")
    detail = response.value.json()["detail"]
    assert response.value.status == 422 and page.text_content("#error") == detail
    assert page.locator("#gallery figure").count() == 0 and page.text_content("#status") == "Failed"


def test_hires_fix_and_a_batch(page):
    fill_form(page, steps=2, seed=20)
    page.fill("#batch_size", "2")
    assert page.is_disabled("#hr_scale")  # the hires options wait for the toggle
    page.check("#enable_hr")
    page.fill("#hr_scale", "1.5")
    page.select_option("#hr_upscaler", "Lanczos")
    page.fill("#hr_denoise", "0.5")
    with page.expect_request("**/sdapi/v1/txt2img") as sent:
        page.click("#generate")
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Lanczos", "denoising_strength": 0.5, "batch_size": 2}
    assert sent.value.post_data_json.items() >= hires.items()
    page.wait_for_function("!document.getElementById('generate').disabled")
    figures = page.locator("#gallery figure.result")
    assert figures.count() == 2 and page.text_content("#status").startswith("Done: 2 images")
    texts = figures.locator("pre.infotext").all_text_contents()
    assert {"Seed: 20" in t for t in texts} == {True, False} and {"Seed: 21" in t for t in texts} == {True, False}
    for figure in figures.all():
        assert png_of(figure.locator("a.download").get_attribute("href")).size == (96, 96)
        text = figure.locator("pre.infotext").text_content()
        assert "Hires upscale: 1.5" in text and "Hires upscaler: Lanczos" in text and "Denoising strength: 0.5" in text
