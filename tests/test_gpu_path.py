"""The GPU path's host-side rules (issue 33), checked on the CPU with stand-ins: the ancestral/SDE samplers' noise
drawn at the sampler's start and moved once; the host kept two steps ahead of the device while callbacks watch."""

import numpy as np
import pytest
import torch
from official import SD1_SCHEDULER

from ldm.sampling import samplers
from ldm.sampling.denoisers import PredictionDenoiser
from ldm.sampling.samplers import SAMPLERS, randn
from ldm.sampling.schedules import SchedulerConfig
from ldm.speed import pacing

# ------------------------------------------------------------------ ancestral/SDE noise, drawn at the start

STOCHASTIC = {"euler_a": None, "dpmpp_2m_sde": None, "ddim": 0.6, "lcm": None, "tcd": 0.3}


def fake_unet(x: torch.Tensor, t) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float32)
    return torch.tanh(0.8 * x + torch.sin(t / 97.0 + x.roll(1, -1))) * 0.7 + 0.2 * x


def run_sampler(name: str, generator, steps: int = 5, on_call=None) -> torch.Tensor:
    cfg = SchedulerConfig.from_diffusers(SD1_SCHEDULER)
    spec = SAMPLERS[name]
    schedule = spec.schedule(cfg, steps, False)
    x = randn((2, 4, 6, 5), generator) * schedule.init_noise_sigma
    denoiser = PredictionDenoiser(fake_unet, schedule, cfg.prediction_type)

    def model(x, sigma):
        if on_call is not None:
            on_call()
        return denoiser(x, sigma)

    return spec.sample(model, x, schedule, eta=STOCHASTIC[name], generator=generator, output=cfg.prediction_type)


def drawn_per_step(x, generator, count):
    """The noise as it was drawn before issue 33: lazily, one `randn(...).to(device, dtype)` when a step asks."""
    return (randn(x.shape, generator).to(x.device, x.dtype) for _ in range(count))


@pytest.mark.parametrize("generators", [1, 2])
@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_noise_drawn_at_the_start_is_bit_identical_to_a_draw_per_step(name, generators, monkeypatch):
    def gens():
        made = [torch.Generator().manual_seed(7 + n) for n in range(generators)]
        return made[0] if generators == 1 else made

    first = gens()
    upfront = run_sampler(name, first)
    monkeypatch.setattr(samplers, "_noises", drawn_per_step)
    second = gens()
    lazily = run_sampler(name, second)
    assert torch.equal(upfront, lazily)
    for a, b in zip([first] if generators == 1 else first, [second] if generators == 1 else second, strict=True):
        assert torch.equal(a.get_state(), b.get_state())  # the generators end where they did: later draws agree


@pytest.mark.parametrize("name", list(STOCHASTIC))
def test_every_draw_happens_before_the_first_step_and_moves_once(name, monkeypatch):
    """No draw (and no host→device copy) between steps: the generator is where it ends by the first UNet call, and
    the noise reached the device in one copy."""
    generator = torch.Generator().manual_seed(3)
    states, moves = [], []
    real = samplers.to_device
    monkeypatch.setattr(samplers, "to_device", lambda host, device: moves.append(host.shape) or real(host, device))
    run_sampler(name, generator, on_call=lambda: states.append(generator.get_state()))
    assert torch.equal(states[0], generator.get_state())
    assert len(moves) == 1 and moves[0][1:] == (2, 4, 6, 5)


def test_to_device_off_cuda_is_a_plain_move():
    host = torch.arange(6.0)
    assert torch.equal(samplers.to_device(host, torch.device("cpu")), host)


# ------------------------------------------------------------- the host two steps ahead, with callbacks


class FakeEvent:
    """Stands in for `torch.cuda.Event`: numbered in the order recorded, remembering whether it was waited on."""

    made: list["FakeEvent"] = []

    def __init__(self):
        self.recorded = self.waited = False
        FakeEvent.made.append(self)

    def record(self, stream=None):
        self.recorded, self.stream = True, stream

    def synchronize(self):
        assert self.recorded
        self.waited = True


def test_with_callbacks_each_step_waits_on_the_event_from_two_steps_back(sd1_folder, monkeypatch):
    from ldm.pipelines.stable_diffusion import StableDiffusion

    monkeypatch.setattr(pacing, "EVENTS", {"cpu": FakeEvent})
    FakeEvent.made = []
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    seen = []

    def watch(step):  # which steps' events the host had waited on when step `step.i` was reported
        seen.append([n for n, e in enumerate(FakeEvent.made) if e.waited])

    args = {"steps": 5, "seed": 1, "width": 64, "height": 64, "sampler": "euler"}
    with_events = np.asarray(pipe("a house", **args, callbacks=[watch]).images[0])
    assert len(FakeEvent.made) == 5 and all(e.recorded for e in FakeEvent.made)
    assert seen == [[], [], [0], [0, 1], [0, 1, 2]]
    FakeEvent.made = []
    without = np.asarray(pipe("a house", **args).images[0])
    assert not FakeEvent.made and np.array_equal(with_events, without)  # no callbacks: nothing recorded


def test_off_cuda_pacing_records_nothing():
    steps = pacing.StepPacing(torch.device("cpu"))
    steps.step()
    assert not steps.events


# ------------------------------------------------------------- free device memory, with stand-in figures


def test_free_memory_counts_the_allocators_reserved_but_unused_bytes(monkeypatch):
    from ldm.speed import tiling

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * 2**30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 6 * 2**30)
    assert tiling.free_bytes(torch.device("cuda")) == 7 * 2**30  # 3 free to the driver + 4 cached by PyTorch


def test_on_cuda_the_event_is_recorded_on_the_runs_device_stream(monkeypatch):
    """A torchrun rank runs on cuda:N: its steps are paced by events on cuda:N's stream, whatever device is current."""
    monkeypatch.setattr(pacing, "EVENTS", {"cuda": FakeEvent})
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    FakeEvent.made = []
    steps = pacing.StepPacing(torch.device("cuda", 1))
    for _ in range(3):
        steps.step()
    assert [e.stream for e in FakeEvent.made] == [("stream of", torch.device("cuda", 1))] * 3
    assert [e.waited for e in FakeEvent.made] == [True, False, False]
