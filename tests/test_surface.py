"""One pipeline surface used from outside, and rules written once: the SDXL base → refiner hand-off as a pipeline of
its own kind (`BaseWithRefiner`), a request checked once per generation, a two-pass result merged by one helper,
PNDM's doubled step counted once by the sampler, one random seed function."""

import numpy as np
import pytest
import torch

from ldm.errors import InputError
from ldm.pipelines import request as requests
from ldm.pipelines.refiner import BaseWithRefiner
from ldm.pipelines.request import GenerationRequest, checked, derived, random_seed
from ldm.pipelines.stable_diffusion import Generation, StableDiffusion
from ldm.sampling.samplers import SAMPLERS, asked_steps
from ldm.sampling.schedules import SchedulerConfig
from ldm.speed.accelerate import CUDAGraphs, TensorTimestep, speed_wrapper

PROMPT = "a lighthouse on a cliff at dusk"
OPTIONS = {"eta": 0.0, "generator": None, "output": "epsilon"}  # what the samplers take besides the grid
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


@pytest.fixture(scope="module")
def sd1(sd1_folder) -> StableDiffusion:
    return StableDiffusion.from_pretrained(sd1_folder, safety_checker=False)


@pytest.fixture(scope="module")
def hand_off(sdxl_folder, sdxl_refiner_folder) -> BaseWithRefiner:
    return BaseWithRefiner(StableDiffusion.from_pretrained(sdxl_folder),
                           StableDiffusion.from_pretrained(sdxl_refiner_folder), start=0.5)


@pytest.fixture
def checks(monkeypatch) -> list[int]:
    """The max_steps of every `GenerationRequest.check` that runs."""
    calls, check = [], GenerationRequest.check

    def counted(self, max_steps: int = 1000):
        calls.append(max_steps)
        return check(self, max_steps)

    monkeypatch.setattr(GenerationRequest, "check", counted)
    return calls


# ------------------------------------------------------------------------------------------ checked once


@pytest.mark.parametrize("options", [{}, {"hires_scale": 1.5, "hires_steps": 2}], ids=["plain", "hires"])
def test_a_generation_checks_its_request_once(sd1, checks, options):
    sd1(GenerationRequest(PROMPT, steps=2, seed=1, width=64, height=64, **options))
    assert checks == [1000]


def test_a_hand_off_checks_its_request_once(hand_off, checks):
    result = hand_off(GenerationRequest(PROMPT, steps=4))  # (and draws one seed for both halves)
    assert checks == [1000] and 0 <= result.seed < 2**32


def test_a_request_checked_already_is_taken_as_checked(sd1, checks):
    request = checked(GenerationRequest(PROMPT, steps=2, seed=1))  # as the command line checks before loading
    sd1(request)
    sd1(request.replace(seed=2))  # `replace` makes a new request: checked where it runs
    assert checks == [1000, 1000]
    assert checked(request, 500) is request and checks == [1000, 1000, 500]  # fewer timesteps: checked again
    part = derived(request, steps=3)
    assert part.steps == 3 and checked(part) is part and len(checks) == 3  # a pipeline's part of a checked run


def test_a_request_is_still_refused(sd1):
    with pytest.raises(InputError, match="steps must be a whole number"):
        sd1(GenerationRequest(PROMPT, steps=0))
    with pytest.raises(InputError, match="steps must be a whole number from 1 to 500"):
        checked(checked(GenerationRequest(PROMPT, steps=600)), 500)


def test_one_random_seed(monkeypatch, sd1):
    assert all(0 <= random_seed() < 2**32 for _ in range(20))
    monkeypatch.setattr(requests.secrets, "randbits", lambda bits: 12345)
    assert sd1(PROMPT, steps=1, width=64, height=64).seed == 12345


# ------------------------------------------------------------------------------------------ PNDM's steps


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_pndm_reports_each_step_asked_for_once(sd1, steps):
    events, begun = [], []

    class Recorder:
        def begin(self, total):
            begun.append(total)

        def __call__(self, step):
            events.append(step)

    plain = sd1(PROMPT, steps=steps, seed=3, sampler="pndm", width=64, height=64)
    watched = sd1(PROMPT, steps=steps, seed=3, sampler="pndm", width=64, height=64, callbacks=[Recorder()])
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(watched.images[0]))
    assert begun == [steps] and [e.i for e in events] == list(range(steps))
    assert all(e.total == steps and not e.repeat for e in events)
    assert watched.evaluations == steps + (steps > 1)  # one UNet call more than steps asked for


def test_the_sampler_marks_pndms_second_call_at_sigma_1_a_repeat():
    schedule = SAMPLERS["pndm"].schedule(SchedulerConfig(), 4, False)
    assert schedule.sigmas[1] == schedule.sigmas[2] and asked_steps(schedule.sigmas) == 4
    events = []
    SAMPLERS["pndm"].sample(lambda x, sigma: x * 0.5, torch.ones(1, 4, 2, 2), schedule, events.append, **OPTIONS)
    assert [e.i for e in events] == [0, 1, 2, 3, 4] and [e.total for e in events] == [5] * 5  # the calls
    assert [e.asked for e in events] == [0, 1, 1, 2, 3] and {e.asked_total for e in events} == {4}
    assert [e.repeat for e in events] == [False, False, True, False, False]


def test_other_samplers_have_no_repeats():
    for name in ("euler", "ddim", "dpmpp_2m"):
        schedule = SAMPLERS[name].schedule(SchedulerConfig(clip_sample=False), 4, False)
        events = []
        SAMPLERS[name].sample(lambda x, sigma: x * 0.5, torch.ones(1, 4, 2, 2), schedule, events.append, **OPTIONS)
        assert [(e.i, e.asked, e.total, e.asked_total, e.repeat) for e in events] == [
            (i, i, 4, 4, False) for i in range(4)]


# ------------------------------------------------------------------------------------------ two passes


def test_a_two_pass_result_merges_notes_evaluations_and_params():
    first = Generation([], 1, notes=["cut", "kept"], params={"Steps": 10, "Size": "64x64", "Model": "m"},
                       evaluations=20)
    seen = {}

    def second_pass(describe):
        seen.update(describe)
        return Generation([], 1, notes=["kept", "new"], params={"Steps": 4} | describe, evaluations=8)

    result = first.then(second_pass, ("Steps", "Size"), {"Hires upscale": 2})
    assert seen == {"Steps": 10, "Size": "64x64", "Hires upscale": 2}
    assert result.notes == ["cut", "kept", "new"] and result.evaluations == 28
    assert result.params == {"Steps": 10, "Size": "64x64", "Hires upscale": 2}


# ------------------------------------------------------------------------------------------ BaseWithRefiner


def test_the_hand_off_is_a_pipeline_of_its_own(hand_off):
    base, refiner = hand_off.base, hand_off.refiner
    networks = hand_off.networks()
    assert networks == {f"base.{k}": v for k, v in base.networks().items()} | {
        f"refiner.{k}": v for k, v in refiner.networks().items()}
    assert "refiner.text_encoder" not in networks and networks["base.unet"] is base.unet
    assert hand_off.name == f"{base.name} + {refiner.name}" and hand_off.dtype == base.dtype
    assert (hand_off.native_size, hand_off.vae_scale, hand_off.notes) == (base.native_size, base.vae_scale, base.notes)
    assert hand_off.chunk_count(PROMPT) == base.chunk_count(PROMPT) == 1
    with pytest.raises(AttributeError):
        hand_off.unet  # noqa: B018 (no imitation of a pipeline: only the surface its users read)


def test_setting_the_device_sets_both_models_without_moving_them(hand_off):
    weight = next(hand_off.base.unet.parameters())
    hand_off.device = "cpu"
    assert hand_off.device == hand_off.base.device == hand_off.refiner.device == torch.device("cpu")
    assert next(hand_off.base.unet.parameters()) is weight


def test_the_hand_off_is_between_an_sdxl_base_and_an_sdxl_refiner(sd1, hand_off):
    with pytest.raises(InputError, match="between SDXL models; .* are SD 1.x and SDXL refiner"):
        BaseWithRefiner(sd1, hand_off.refiner)
    with pytest.raises(InputError, match="the first must be an SDXL base, the second an SDXL refiner"):
        BaseWithRefiner(hand_off.refiner, hand_off.base)
    with pytest.raises(InputError, match="strictly between 0 and 1"):
        BaseWithRefiner(hand_off.base, hand_off.refiner, start=1.0)


# ------------------------------------------------------------------------------------------ speed wrappers


def test_offload_finds_the_unets_speed_wrapper(sd1_folder):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    unet = pipe.unet
    assert speed_wrapper(unet) is None
    pipe.unet = TensorTimestep(unet, graphs=CUDAGraphs(unet))
    assert speed_wrapper(unet) is pipe.unet and pipe.networks()["unet"] is unet
    pipe.unet = unet
    assert all(speed_wrapper(network) is None for network in pipe.networks().values())  # the wrapper is gone


def test_offload_refuses_compiled_networks_by_type(sd1_folder):
    from ldm.speed.accelerate import accelerate
    from ldm.speed.offload import enable_offload

    pipe = accelerate(StableDiffusion.from_pretrained(sd1_folder), compile=True, backend="aot_eager")  # (lazy)
    assert isinstance(pipe.unet, TensorTimestep) and speed_wrapper(pipe.networks()["unet"]) is pipe.unet
    with pytest.raises(InputError, match=r"unet cannot be offloaded: it is compiled \(torch.compile\)"):
        enable_offload(pipe, "model", "cpu")
    pipe.unet = pipe.networks()["unet"]  # the eager UNet again: the VAE's decoder is still compiled
    with pytest.raises(InputError, match=r"vae cannot be offloaded: it is compiled"):
        enable_offload(pipe, "model", "cpu")
