"""Image prompts (IP-Adapter) through the scoring schema: `parameters.ip_adapter` (an adapter of the server's
weights/ipadapter/ by name, never a path), `ip_weight`/`ip_start`/`ip_end`/`ip_image_encoder`, a row's `ip_image`
cell (one image or a list, averaged) over HTTP (`ldm serve` on a loopback port), in `ldm batch` (JSON lines and the
Azure CSV layout, images as files beside the input), and the mistakes: paths in a request, unreadable or missing
reference images, an adapter or encoder that does not fit the served model.

Each image is compared bit for bit with the Python API's `pipe(…, image_prompts=[ImagePrompt(…)])` at the same seed,
which tests/test_ip_adapter.py proves equal to diffusers' pipelines after `load_ip_adapter`."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from test_ip_adapter import PROMPT, adapter_file, make_encoder, ours, reference_image
from test_serve import Server

from ldm import ImagePrompt
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.limits import Limits
from ldm.serving.schema import RequestError, image_urls, parse
from ldm.serving.server import ServeConfig

FAST = {"num_inference_steps": 4, "scheduler": "euler", "seed": 3}

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py) every comparison is within this process


@pytest.fixture(scope="module")
def store(sd1_folder, sdxl_folder, tmp_path_factory):
    """A weights/ store: the tiny SD 1.x adapter as `tiny-ip`, an SDXL one as `tiny-ip-xl`, and two encoders in
    clip_vision/, the first in name order (`a-narrow`) too narrow for the adapters (so the default must choose)."""
    root = tmp_path_factory.mktemp("weights")
    (root / "ipadapter").mkdir()
    adapter_file(root / "ipadapter" / "tiny-ip.safetensors", sd1_folder, "plain", 24, seed=1)
    adapter_file(root / "ipadapter" / "tiny-ip-xl.safetensors", sdxl_folder, "plain", 24, seed=4)
    make_encoder(root / "clip_vision" / "a-narrow", projection_dim=16, hidden_size=16)
    make_encoder(root / "clip_vision" / "b-fits")
    return root


@pytest.fixture(autouse=True)
def served_weights(store, monkeypatch):
    monkeypatch.setenv("LDM_WEIGHTS", str(store))


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture(scope="module")
def server(pipe):
    s = Server(lambda: pipe, ServeConfig(queue_size=4, batch_size=4))  # (rows of a pass: each row still alone)
    yield s
    s.close()


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pixels(answer: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["generated_image"])))).astype(np.int16)


def request(rows: list, **parameters) -> dict:
    return {"input_data": {"columns": ["prompt", "ip_image"], "data": rows, "parameters": FAST | parameters}}


def adapter(store) -> str:
    return str(store / "ipadapter" / "tiny-ip.safetensors")


def test_score_over_http_equals_python(server, pipe, store):
    """Row 0 one reference, row 1 two (averaged), row 2 none (its error; the others answered); weight, start and
    end reach the request; a batching server still runs each row with its own references."""
    one, two = reference_image(11), [reference_image(12), reference_image(13)]
    status, _, out = server.request("POST", "/score", request(
        [[PROMPT, b64png(one)], [PROMPT, [b64png(image) for image in two]], [PROMPT, None]],
        ip_adapter="tiny-ip", ip_weight=0.6, ip_start=0.25, ip_end=0.75))
    assert status == 200 and len(out) == 3
    settings = {"weight": 0.6, "start": 0.25, "end": 0.75}
    assert np.array_equal(pixels(out[0]), ours(pipe, [ImagePrompt(adapter(store), one, **settings)], seed=3))
    assert np.array_equal(pixels(out[1]), ours(pipe, [ImagePrompt(adapter(store), two, **settings)], seed=4))
    assert out[2]["error"]["field"] == "data[2].ip_image" and "missing" in out[2]["error"]["message"]
    infotext = Image.open(io.BytesIO(base64.b64decode(out[0]["generated_image"]))).text["parameters"]
    assert "Model: tiny-ip, Weight: 0.6," in infotext and "Guidance Start: 0.25, Guidance End: 0.75" in infotext
    status, _, heavier = server.request("POST", "/score", request([[PROMPT, b64png(one)]], ip_adapter="tiny-ip",
                                                                  ip_weight=1.5, ip_image_encoder="b-fits"))
    assert status == 200
    expected = ours(pipe, [ImagePrompt(adapter(store), one, weight=1.5)], seed=3)
    assert np.array_equal(pixels(heavier[0]), expected) and not np.array_equal(expected, pixels(out[0]))


def test_bad_parameters_are_400_naming_the_field(server, store):
    """A path (even of the server's own adapter file), a name not in the folder, values out of range, and the
    image prompt's settings without an adapter."""
    row = [[PROMPT, b64png(reference_image(1))]]
    cases = [({"ip_adapter": adapter(store)}, "parameters.ip_adapter", "not a path"),
             ({"ip_adapter": "../ipadapter/tiny-ip"}, "parameters.ip_adapter", "not a path"),
             ({"ip_adapter": "no-such"}, "parameters.ip_adapter", "no such file or folder"),
             ({"ip_adapter": ["tiny-ip"]}, "parameters.ip_adapter", 'expected "NAME"'),
             ({"ip_adapter": "tiny-ip", "ip_image_encoder": str(store / "clip_vision" / "b-fits")},
              "parameters.ip_image_encoder", "not a path"),
             ({"ip_adapter": "tiny-ip", "ip_weight": 3}, "parameters.ip_weight", "from 0 to 2"),
             ({"ip_adapter": "tiny-ip", "ip_start": 0.8, "ip_end": 0.5}, "parameters.ip_start", "0 ≤ start < end"),
             ({"ip_adapter": "tiny-ip", "ip_weight": "1"}, "parameters.ip_weight", "a finite number"),
             ({"ip_weight": 0.5}, "parameters.ip_weight", "give parameters.ip_adapter")]
    for parameters, field, message in cases:
        status, _, out = server.request("POST", "/score", request(row, **parameters))
        assert status == 400 and out["error"]["field"] == field and message in out["error"]["message"], out


def bomb(side: int) -> str:
    """Some KB of PNG that would decode to side² pixels."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_bad_reference_images_are_their_rows_errors(server, tmp_path):
    """No file is opened from a request (a path to a real image is refused as a path); what cannot be read, an
    image too large by its header (over 4× the pixels per image, a control image's allowance: a reference is
    resized to the encoder's size), a URL on a server that fetches none, a reference without an adapter: each its
    row's error naming the cell, the other rows answered (one over the pixels per image but within 4×)."""
    reference_image(2).save(tmp_path / "ref.png")
    bad = [str(tmp_path / "ref.png"), "./ref.png", "~/ref.png", base64.b64encode(b"not an image").decode(),
           bomb(2100), "https://example.com/ref.png", [b64png(reference_image(3)), None]]
    status, _, out = server.request("POST", "/score", request([[PROMPT, cell] for cell in bad]
                                                              + [[PROMPT, bomb(1500)]], ip_adapter="tiny-ip"))
    assert status == 200 and "generated_image" in out[-1]
    errors = [o["error"] for o in out[:-1]]
    assert [e["field"] for e in errors] == [f"data[{i}].ip_image" for i in range(len(bad))]
    messages = [e["message"] for e in errors]
    assert all("looks like a file path" in m for m in messages[:3]), messages
    assert "not a readable image" in messages[3], messages
    assert f"larger than the {4 * Limits().max_pixels} pixels" in messages[4], messages
    assert "not fetched by this server" in messages[5] and "null" in messages[6], messages
    status, _, out = server.request("POST", "/score", request([[PROMPT, b64png(reference_image(5))]]))
    assert status == 200 and out[0]["error"]["field"] == "data[0].ip_image"
    assert "give parameters.ip_adapter" in out[0]["error"]["message"]


def test_reference_urls_are_fetched_with_the_other_images():
    body = request([[PROMPT, ["https://example.com/a.png", "https://example.com/b.png"]]], ip_adapter="tiny-ip")
    assert image_urls(body, Limits()) == ["https://example.com/a.png", "https://example.com/b.png"]


def test_what_does_not_fit_the_model_is_the_rows_error(server, pipe, store):
    """An SDXL adapter on the SD 1.x server, an encoder of the wrong width: each row's error naming both (never a
    500), and the server answers the next request."""
    row = [[PROMPT, b64png(reference_image(6))]] * 2
    status, _, out = server.request("POST", "/score", request(row, ip_adapter="tiny-ip-xl"))
    assert status == 200 and [o["error"]["field"] for o in out] == ["data[0]", "data[1]"]
    assert "IP-Adapter tiny-ip-xl.safetensors is for a UNet of cross-attention width" in out[0]["error"]["message"]
    assert f"; {pipe.name} has cross-attention width 64" in out[0]["error"]["message"]
    status, _, out = server.request("POST", "/score", request(row[:1], ip_adapter="tiny-ip",
                                                              ip_image_encoder="a-narrow"))
    assert status == 200 and out[0]["error"]["field"] == "data[0]"
    assert "IP-Adapter tiny-ip (plain) reads image embeddings" in out[0]["error"]["message"]
    assert "the image encoder a-narrow gives width 16" in out[0]["error"]["message"]
    status, _, out = server.request("POST", "/score", request(row[:1], ip_adapter="tiny-ip"))
    assert status == 200 and "generated_image" in out[0]


def test_parse_holds_the_image_prompt(store):
    p = parse(request([[PROMPT, b64png(reference_image(7))]], ip_adapter="tiny-ip", ip_image_encoder="b-fits"))
    assert p.parameters.ip_adapter == adapter(store)
    assert p.parameters.ip_image_encoder == str(store / "clip_vision" / "b-fits")
    with pytest.raises(RequestError, match="not a path"):
        parse(request([[PROMPT, b64png(reference_image(7))]], ip_adapter="/etc/passwd"))


def test_batch_rows_take_reference_files(pipe, store, tmp_path):
    """`ldm batch`: JSON lines whose `ip_image` names files beside the input (one, or a list), and the Azure layout's
    CSV with an `ip_image` column; row i gets seed + i, each image the Python API's."""
    from ldm.serving.azure import read_azure_input
    from ldm.serving.batch import prepare_batch, run_batch

    for n in (1, 2, 3):
        reference_image(20 + n).save(tmp_path / f"ref{n}.png")
    refs = [Image.open(tmp_path / f"ref{n}.png") for n in (1, 2, 3)]
    parameters = FAST | {"ip_adapter": "tiny-ip", "ip_weight": 0.8}
    lines = [{"prompt": PROMPT, "ip_image": "ref1.png"}, {"prompt": PROMPT, "ip_image": ["ref2.png", "ref3.png"]}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    batch = prepare_batch(tmp_path / "rows.jsonl", tmp_path / "out", parameters)
    assert run_batch(pipe, batch) == (2, 0, 0)
    for n, (references, seed) in enumerate([(refs[0], 3), (refs[1:], 4)]):
        expected = ours(pipe, [ImagePrompt(adapter(store), references, weight=0.8)], seed=seed)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / f"{n:05d}.png")).astype(np.int16), expected)
    (tmp_path / "azure").mkdir()
    (tmp_path / "azure" / "rows.csv").write_text(f"prompt,ip_image\n{PROMPT},../ref3.png\n")
    batch = prepare_batch(read_azure_input(tmp_path / "azure", parameters), tmp_path / "azure-out", parameters)
    assert run_batch(pipe, batch) == (1, 0, 0)
    expected = ours(pipe, [ImagePrompt(adapter(store), refs[2], weight=0.8)], seed=3)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "azure-out" / "00000.png")).astype(np.int16), expected)


@pytest.mark.parametrize("parameters", [{"ip_adapter": "nope"}, {"controlnet": "nope"}, {"loras": ["nope"]}])
def test_an_answer_names_no_folder_of_the_server(parameters, monkeypatch, tmp_path):
    """A loader's error says where it looked; the answer says `weights/…`, not the server's own folder."""
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("LDM_WEIGHTS", str(store))
    body = {"input_data": {"columns": ["prompt"], "data": ["x"]}, "parameters": parameters}
    with pytest.raises(RequestError) as caught:
        parse(body)
    assert "nope" in caught.value.message and str(tmp_path) not in caught.value.message


@pytest.mark.parametrize("given", [".", "w", "store", "{tmp}/store", "{tmp}/nested/store"])
def test_only_the_weights_folder_itself_is_renamed_in_an_answer(given, monkeypatch, tmp_path):
    """`echo` names the server's folder `weights` where a message holds it as a path (absolute, or $LDM_WEIGHTS of
    more than one name), never inside other text: a short $LDM_WEIGHTS (`.`, `w`) left every number and word whole."""
    from ldm.loading.families import weights_dir
    from ldm.serving.schema import echo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LDM_WEIGHTS", given.format(tmp=tmp_path))
    where = weights_dir().resolve()
    assert echo(f"got 0.5 for x.y with w at {where}/ipadapter/a.safetensors") == \
        "got 0.5 for x.y with w at weights/ipadapter/a.safetensors"
    assert echo(f"{where}x/other: {where}") == f"{where}x/other: weights"  # (another folder beginning like it)
    if len(weights_dir().parts) > 1:
        assert echo(f"'{weights_dir()}/clip_vision/vit-h'") == "'weights/clip_vision/vit-h'"
