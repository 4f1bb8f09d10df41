"""Samplers: pure functions `(model, x, sigmas, ...) -> x` over a denoiser, k-diffusion style.

`model(x, sigma)` returns the denoised estimate x0 of `x = x0 + sigma * noise` (the variance-exploding
parametrisation); `sigmas` is the descending grid to walk, its last entry where sampling stops (0, or
the smallest training sigma for DDIM/PNDM without `set_alpha_to_one`). ε/v prediction, guidance and
the timestep each sigma maps to live in the denoiser (see `denoisers.py`), not here. Each sampler's
arithmetic is that of the diffusers scheduler of the same name; `schedules.py` builds the grids.
The arithmetic every sampler shares is written once, as k-diffusion writes it: `to_d` (the ODE
derivative dx/dσ from a denoised estimate), `get_ancestral_step` (how far an ancestral/DDIM step goes
down and how much fresh noise brings it back up) and `_noises` (a run's N(0, 1) like x from the CPU generator,
drawn at its start).

`callback(step)` gets one `Step` after each step: its index, the step count, the σ it started from, the
latents after it and the denoiser's x0 estimate at that σ (k-diffusion's callback dict, as a type). If it
returns a tensor, sampling continues from that one (as diffusers' `callback_on_step_end` may replace the
latents; inpainting with a 4-channel UNet pastes the re-noised known region back this way). Samplers that
evaluate the denoiser more than once per step report the first evaluation (at `sigma`, on the latents the
step started from); PNDM, whose steps are its UNet calls, reports each call's own evaluation. A step also says
where it stands among the steps asked for (`asked`, `asked_total`): PNDM evaluates its second timestep twice
(to correct its first step, then to take its second), so its grid holds that σ twice, and the second of those
calls is a `repeat`: a second report of one step asked for, which a count of the steps (a progress bar,
previews) skips.
"""

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ldm.choices import KARRAS_SAMPLERS, SAMPLER_LABELS
from ldm.sampling.schedules import (
    Schedule,
    SchedulerConfig,
    ddim_schedule,
    dpm_schedule,
    euler_schedule,
    lcm_schedule,
    pndm_schedule,
    tcd_schedule,
    unipc_schedule,
)

Denoiser = Callable[[Tensor, float], Tensor]


@dataclass(frozen=True)
class Step:
    """A finished sampler step (k-diffusion's callback dict as a type)."""

    i: int  # the step's index, 0-based (PNDM: its UNet call's)
    total: int  # steps in this run (len(sigmas) - 1; PNDM: its UNet calls)
    sigma: float  # the σ the step started from (sigmas[i])
    x: Tensor  # the σ-space latents after the step
    denoised: Tensor  # the denoiser's x0 estimate at `sigma` (the step's first evaluation)
    asked: int  # its index among the steps asked for (`asked_steps`: a σ the grid holds twice is one step)
    asked_total: int  # the steps asked for in this run
    repeat: bool  # its σ is the step before's: a second report of one step asked for (PNDM's second call at σ_1)


StepCallback = Callable[[Step], Tensor | None]  # what it returns, if anything, is the latents to continue from


def asked_steps(sigmas: list[float]) -> int:
    """The steps asked for in a run over `sigmas`: one per σ it starts from, a σ the grid holds twice in a row
    counted once (PNDM's second timestep, evaluated to correct its first step and again to take its second)."""
    return len(set(sigmas[:-1]))


def _step_end(callback: StepCallback | None, sigmas: list[float], i: int, x: Tensor, denoised: Tensor) -> Tensor:
    """Step i is done: tell `callback`, and continue from the latents it returns, if any."""
    if callback is None:
        return x
    step = Step(i, len(sigmas) - 1, sigmas[i], x, denoised, asked=asked_steps(sigmas[:i + 2]) - 1,
                asked_total=asked_steps(sigmas), repeat=i > 0 and sigmas[i] == sigmas[i - 1])
    replaced = callback(step)
    return x if replaced is None else replaced


def to_d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """The probability-flow ODE's derivative dx/dσ = (x - x0)/σ at (x, σ), from the denoiser's x0
    (Karras et al. 2022, eq. 3 with σ(t) = t; k-diffusion's `to_d`)."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """An ancestral step from σ_from to σ_to as (σ_down, σ_up): the deterministic step goes down to σ_down,
    then fresh noise of standard deviation σ_up brings the latents back up to σ_to (σ_down² + σ_up² = σ_to²).
    σ_up is η times the DDPM posterior's (Song et al. 2020, eq. 16): η = 1 is ancestral sampling, η = 0 a
    DDIM/Euler step. k-diffusion's `get_ancestral_step`, without its clamp of σ_up to σ_to (so η > 1 is not
    meaningful), as diffusers has none."""
    sigma_up = eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def randn(shape, generator: "torch.Generator | list[torch.Generator] | None") -> Tensor:
    """N(0, 1) drawn on the CPU in float32 (so a seed gives the same image on every device). With a list of
    k generators, the batch is k equal groups and group i's noise is one draw from generator i: one generator
    per image is diffusers' `randn_tensor` rule; one per prompt gives each prompt's images exactly the noise a
    call of their own draws (one draw of n images is not n draws of one: CPU normal_ fills in blocks of 16)."""
    if isinstance(generator, list):
        n = shape[0] // len(generator)
        return torch.cat([torch.randn((n, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _noises(x: Tensor, generator: "torch.Generator | list[torch.Generator] | None", count: int) -> "Iterator[Tensor]":
    """The fresh N(0, 1) noise like x of a whole ancestral/SDE run, one tensor per draw, in the order the steps use
    it. Drawn at the sampler's start, one `randn` per step as a step of its own would draw it (so the values are
    bit for bit those of a draw at every step, and the generator ends where it would), then moved to x's device in
    one copy (`to_device`): a pageable copy at every step would wait for the GPU to finish the step before. The cost
    is memory: the run's noise at once, `count` × the latents' size (30 steps of one SDXL 1024² image's latents
    in fp32: 7.5 MiB)."""
    if count == 0:
        return iter(())
    draws = torch.stack([randn(x.shape, generator) for _ in range(count)]).to(x.dtype)
    return iter(to_device(draws, x.device).unbind(0))


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """`host` (a CPU tensor) on `device`: on CUDA through pinned memory and without waiting (the copy is queued on
    the current stream, behind the work already there, and the host goes on); elsewhere `.to(device)`."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def sample_euler(model: Denoiser, x: Tensor, sigmas: list[float], callback: StepCallback | None = None) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
        x = _step_end(callback, sigmas, i, x, denoised)
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: Tensor, sigmas: list[float], callback: StepCallback | None = None) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1 without churn): Euler, then the trapezoidal
    correction with the derivative at the Euler point; a plain Euler step into σ = 0. A `Step`'s `denoised`
    is the first evaluation (at σ_i), not the one at the Euler point."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, sigma_next, model(x_euler, sigma_next))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        x = _step_end(callback, sigmas, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: Tensor, sigmas: list[float], callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, midpoint form as diffusers' default): multistep in
    λ = -log σ; first order on the first step and into σ = 0."""
    x0_prev = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, sigma)
        ratio = sigma_next / sigma  # e^(-h)
        if x0_prev is None or sigma_next == 0:
            x = ratio * x + (1 - ratio) * x0
        else:
            r = math.log(sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)  # h_prev / h
            x = ratio * x + (1 - ratio) * (x0 + (x0 - x0_prev) / (2 * r))
        x0_prev = x0
        x = _step_end(callback, sigmas, i, x, x0)
    return x


def lms_coefficient(sigmas: list[float], order: int, i: int, j: int) -> float:
    """∫ from σ_i to σ_(i+1) of the Lagrange basis polynomial of node σ_(i-j) on σ_i, …, σ_(i-order+1)
    (exactly, where diffusers and k-diffusion call scipy's quad)."""
    basis = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            basis *= np.poly1d([1.0, -sigmas[i - k]]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@torch.no_grad()
def sample_lms(model: Denoiser, x: Tensor, sigmas: list[float], order: int = 4, grid: list[float] | None = None,
               offset: int = 0, callback: StepCallback | None = None) -> Tensor:
    """Linear multistep (k-diffusion's `sample_lms`): Adams–Bashforth on the σ-derivative with
    coefficients for the uneven σ grid, of order up to 4.

    Started part-way (`sigmas` = `grid[offset:]`), diffusers takes the order and the coefficients from
    the step's place in the whole `grid` and applies as many as it has derivatives; so does this."""
    grid = sigmas if grid is None else grid
    history: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma)
        history = (history + [to_d(x, sigma, denoised)])[-order:]
        step = offset + i
        current = min(step + 1, order)
        coefficients = [lms_coefficient(grid, current, step, j) for j in range(current)]
        x = x + sum(c * d for c, d in zip(coefficients, reversed(history), strict=False))
        x = _step_end(callback, sigmas, i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x: Tensor, sigmas: list[float], generator: torch.Generator | None = None,
                        callback: StepCallback | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022; diffusers' `sde-dpmsolver++`, midpoint, η = 1): the 2M update
    with e^(-2h) weights plus fresh noise σ_next·√(1 - e^(-2h)), drawn at every step."""
    x0_prev, noises = None, _noises(x, generator, len(sigmas) - 1)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = model(x, sigma)
        decay = (sigma_next / sigma) ** 2  # e^(-2h)
        if x0_prev is None or sigma_next == 0:
            d = x0
        else:
            r = math.log(sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)
            d = x0 + (x0 - x0_prev) / (2 * r)
        x = decay * x + (1 - decay) * d + next(noises) * (sigma_next * (1 - decay) ** 0.5)
        x0_prev = x0
        x = _step_end(callback, sigmas, i, x, x0)
    return x


def _unipc_update(x: Tensor, sigmas: list[float], s: int, x0s: list[Tensor], order: int,
                  x0_new: Tensor | None = None) -> Tensor:
    """UniPC's B(h)=e^(-h)-1 update from σ_s to σ_(s+1) in data prediction: the predictor UniP, or, given the
    x0 evaluated at the predicted point, the corrector UniC. `x0s[-1]` is the x0 at σ_s, earlier ones
    before it."""
    def lam(k: int) -> float:  # λ = log(α/σ) = -log σ in σ-space
        return -math.log(sigmas[k]) if sigmas[k] > 0 else math.inf

    h = lam(s + 1) - lam(s)
    m0 = x0s[-1]
    rks = [(lam(s - j) - lam(s)) / h for j in range(1, order)] + [1.0]
    diffs = [(x0s[-(j + 1)] - m0) / rks[j - 1] for j in range(1, order)]
    h_phi_1 = math.expm1(-h)  # e^(-h) - 1 = σ_(s+1)/σ_s - 1 = B(h)
    h_phi, factorial, b = h_phi_1 / -h - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi * factorial / h_phi_1)
        factorial *= k + 1
        h_phi = h_phi / -h - 1 / factorial
    R = np.array([[r ** k for r in rks] for k in range(order)])
    if x0_new is None:  # predictor, from the earlier x0s only
        if order <= 2:
            rhos = [0.5] * (order - 1)
        else:
            rhos = list(np.linalg.solve(R[:-1, :-1], b[:-1]))
        residual = sum((rho * d for rho, d in zip(rhos, diffs, strict=True)), torch.zeros_like(x))
    else:  # corrector
        rhos = [0.5] if order == 1 else list(np.linalg.solve(R, b))
        residual = sum((rho * d for rho, d in zip(rhos[:-1], diffs, strict=True)), rhos[-1] * (x0_new - m0))
    return (h_phi_1 + 1) * x - h_phi_1 * m0 - h_phi_1 * residual


@torch.no_grad()
def sample_unipc(model: Denoiser, x: Tensor, sigmas: list[float], order: int = 2,
                 callback: StepCallback | None = None) -> Tensor:
    """UniPC (Zhao et al. 2023) as diffusers' UniPCMultistepScheduler defaults (bh2, data prediction,
    order 2, lower order at the end): each new evaluation first corrects the point it was taken at
    (UniC, not re-evaluated), then the multistep predictor (UniP) moves on. A `Step`'s `denoised` is that
    evaluation: the x0 at σ_i of the predicted latents, before UniC corrects them."""
    x0s: list[Tensor] = []
    x_prev, prev_order = None, 0
    for i in range(len(sigmas) - 1):
        x0 = model(x, sigmas[i])
        if x_prev is not None:
            x = _unipc_update(x_prev, sigmas, i - 1, x0s, prev_order, x0)
        x0s = (x0s + [x0])[-order:]
        # lower order at the end of the whole schedule (the step into σ = 0), not of a part run before a hand-off
        prev_order = min(order, len(x0s), 1 if sigmas[i + 1] == 0 else order)
        x_prev = x
        x = _unipc_update(x, sigmas, i, x0s, prev_order)
        x = _step_end(callback, sigmas, i, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: Tensor, sigmas: list[float], generator: torch.Generator | None = None,
                           callback: StepCallback | None = None) -> Tensor:
    """Ancestral Euler (k-diffusion's `sample_euler_ancestral`, η=1): an Euler step down to σ_down, then
    fresh noise up to σ_next. diffusers draws the noise at every step, the last one included."""
    noises = _noises(x, generator, len(sigmas) - 1)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next)
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        x = x + next(noises) * sigma_up
        x = _step_end(callback, sigmas, i, x, denoised)
    return x


@torch.no_grad()
def sample_ddim(model: Denoiser, x: Tensor, sigmas: list[float], eta: float = 0.0,
                generator: torch.Generator | None = None, lands: list[float] | None = None,
                callback: StepCallback | None = None) -> Tensor:
    """DDIM (Song et al. 2020) in σ-space: with η=0 the Euler step of the probability-flow ODE; η>0 adds
    fresh noise of variance η²·σ_to²(σ²-σ_to²)/σ² (eq. 16), drawn from `generator` on the CPU.

    `lands[i]`, when given, is where step i lands instead of σ_(i+1); the latent is then read at σ_(i+1)
    with its variance-preserving value kept, as diffusers does when its step misses the grid."""
    targets = sigmas[1:] if lands is None else lands
    drawn = sum(get_ancestral_step(sigmas[i], targets[i], eta)[1] > 0 for i in range(len(sigmas) - 1))
    noises = _noises(x, generator, drawn)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_to = sigma_next if lands is None else lands[i]
        x0 = model(x, sigma)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_to, eta)
        x = x0 + to_d(x, sigma, x0) * sigma_down
        if sigma_up > 0:
            x = x + next(noises) * sigma_up
        if sigma_to != sigma_next:
            x = x * ((1 + sigma_next**2) / (1 + sigma_to**2)) ** 0.5
        x = _step_end(callback, sigmas, i, x, x0)
    return x


@torch.no_grad()
def sample_pndm(model: Denoiser, x: Tensor, sigmas: list[float], output: str = "epsilon",
                froms: list[float] | None = None, lands: list[float] | None = None,
                callback: StepCallback | None = None) -> Tensor:
    """Pseudo linear multistep (Liu et al. 2022, PNDM/PLMS) as diffusers runs it with `skip_prk_steps`:
    a pseudo improved-Euler first step, then Adams–Bashforth of order 2, 3, 4.

    One iteration per UNet call, as diffusers' list (its second timestep twice): call 0 predicts with
    Euler, call 1 evaluates there and redoes the step from the saved start with the mean of both outputs.
    diffusers combines the network's own outputs: ε for ε-models, v for v-models (`output`), each then
    turned into ε at the point the step starts from; the two differ for v-models because v depends on x.
    Call c evaluates at σ_c and steps from `froms[c]` to `lands[c]` (default σ_c, σ_(c+1)); a latent is
    moved between σ labels keeping its variance-preserving value, as diffusers' latents are.

    A `Step` per call (so `total` counts the first step twice; the second call at σ_1 is a `repeat`): `denoised`
    is that call's own evaluation, the x0 at σ_c of the latents it was given. For call 1 that is the x0 at the
    Euler-predicted point, not of the latents it returns (the corrected step mixes both calls' outputs, no one x0).
    """
    froms = sigmas[:-1] if froms is None else froms
    lands = sigmas[1:] if lands is None else lands

    def relabel(x: Tensor, old: float, new: float) -> Tensor:
        return x if old == new else x * ((1 + new**2) / (1 + old**2)) ** 0.5

    def to_output(x: Tensor, x0: Tensor, sigma: float) -> Tensor:
        if output == "epsilon":
            return to_d(x, sigma, x0)  # ε = (x - x0)/σ
        return (x / (1 + sigma**2) - x0) * ((1 + sigma**2) ** 0.5 / sigma)

    def to_eps(out: Tensor, x: Tensor, sigma: float) -> Tensor:
        if output == "epsilon":
            return out
        return (out + x * (sigma / (1 + sigma**2) ** 0.5)) / (1 + sigma**2) ** 0.5

    history: list[Tensor] = []
    saved = None
    for c in range(len(sigmas) - 1):
        sigma = sigmas[c]
        x0 = model(x, sigma)
        out = to_output(x, x0, sigma)
        if c == 1:  # the correction: the mean of both outputs, from the saved start
            out, x = (out + history[-1]) / 2, saved
        else:
            saved = x if c == 0 else saved
            history = (history + [out])[-4:]
            if len(history) == 2:
                out = (3 * history[-1] - history[-2]) / 2
            elif len(history) == 3:
                out = (23 * history[-1] - 16 * history[-2] + 5 * history[-3]) / 12
            elif len(history) == 4:
                out = (55 * history[-1] - 59 * history[-2] + 37 * history[-3] - 9 * history[-4]) / 24
        x = relabel(x, sigmas[0] if c == 1 else sigma, froms[c])
        x = x + to_eps(out, x, froms[c]) * (lands[c] - froms[c])
        x = _step_end(callback, sigmas, c, relabel(x, lands[c], sigmas[c + 1]), x0)
    return x


@torch.no_grad()
def sample_lcm(model: Denoiser, x: Tensor, sigmas: list[float], boundary: list[tuple[float, float]],
               generator: torch.Generator | None = None, callback: StepCallback | None = None) -> Tensor:
    """Latent consistency models' multistep sampler (Luo et al. 2023, Algorithm 3; diffusers' LCMScheduler): the
    consistency function c_out·x0 + c_skip·x (on the variance-preserving latents) is the step's estimate, noised
    afresh to the next σ; the last step returns the estimate. A `Step`'s `denoised` is the denoiser's x0, before
    the boundary condition (c_skip < 1e-5 everywhere on the distillation grid)."""
    noises = _noises(x, generator, sum(sigma_next > 0 for sigma_next in sigmas[1:]))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        c_skip, c_out = boundary[i]
        x0 = model(x, sigma)
        estimate = c_out * x0 + c_skip * (x / (1.0 + sigma**2) ** 0.5)
        x = estimate + next(noises) * sigma_next if sigma_next > 0 else estimate
        x = _step_end(callback, sigmas, i, x, x0)
    return x


@torch.no_grad()
def sample_tcd(model: Denoiser, x: Tensor, sigmas: list[float], lands_at: list[int], training_sigmas: np.ndarray,
               eta: float = 0.3, generator: torch.Generator | None = None,
               callback: StepCallback | None = None) -> Tensor:
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024, Algorithm 4;
    diffusers' TCDScheduler), γ = `eta`: a DDIM step from σ down to σ_s of s = ⌊(1 − γ)·t_next⌋, then fresh noise
    back up to σ_next (none with γ = 0, or after the last step, which lands on t = 0)."""
    noises = _noises(x, generator, sum(eta > 0 and lands_at[i] > 0 for i in range(len(sigmas) - 1)))
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        s = int(torch.floor((1 - eta) * torch.tensor(lands_at[i])))  # as diffusers rounds it, in float32
        sigma_s = float(training_sigmas[s]) if s != lands_at[i] else sigma_next
        x = denoised + to_d(x, sigma, denoised) * sigma_s
        if eta > 0 and lands_at[i] > 0:
            x = x + next(noises) * max(sigma_next**2 - sigma_s**2, 0.0) ** 0.5
        x = _step_end(callback, sigmas, i, x, denoised)
    return x


# ------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name: its function, how it builds its grid, and the diffusers scheduler it matches."""

    run: Callable[..., Tensor]
    schedule: Callable[[SchedulerConfig, int, bool], Schedule]  # (config, steps, karras)
    diffusers_class: str
    label: str  # AUTOMATIC1111's name, written into the PNG parameters
    options: tuple[str, ...] = ()  # keyword arguments it takes beyond (model, x, sigmas, callback)
    karras: bool = False  # takes Karras σ (where the diffusers scheduler has `use_karras_sigmas`)
    spacing: bool = True  # its grid follows `timestep_spacing` (LCM and TCD take theirs from the distillation grid)
    eta: float = 0.0  # the η (TCD: γ) it runs with when a request gives none
    # the prediction types its diffusers scheduler implements
    predictions: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
    # diffusers runs each step as two scheduler calls (Heun), so cuts and per-call pastes fall mid-step
    two_calls_per_step: bool = False

    def sample(self, model: Denoiser, x: Tensor, schedule: Schedule, callback: StepCallback | None = None,
               **available) -> Tensor:
        """Run over `schedule`, given the options it takes from `available` (eta, generator, output)."""
        available |= {"froms": schedule.froms, "lands": schedule.lands, "grid": schedule.grid or schedule.sigmas,
                      "offset": schedule.offset, "boundary": schedule.boundary, "lands_at": schedule.lands_at,
                      "training_sigmas": schedule.training_sigmas}
        if available.get("eta") is None:
            available["eta"] = self.eta
        return self.run(model, x, schedule.sigmas, callback=callback, **{k: available[k] for k in self.options})


def _spec(name: str, run, schedule, diffusers_class: str, **more) -> SamplerSpec:
    return SamplerSpec(run, schedule, diffusers_class, SAMPLER_LABELS[name], karras=name in KARRAS_SAMPLERS, **more)


EPS_OR_V = ("epsilon", "v_prediction")  # PNDMScheduler and EulerAncestralDiscreteScheduler take no "sample"

SAMPLERS: dict[str, SamplerSpec] = {
    "pndm": _spec("pndm", sample_pndm, pndm_schedule, "PNDMScheduler", options=("output", "froms", "lands"),
                  predictions=EPS_OR_V),
    "ddim": _spec("ddim", sample_ddim, ddim_schedule, "DDIMScheduler", options=("eta", "generator", "lands")),
    "euler": _spec("euler", sample_euler, euler_schedule, "EulerDiscreteScheduler"),
    "euler_a": _spec("euler_a", sample_euler_ancestral, euler_schedule, "EulerAncestralDiscreteScheduler",
                     options=("generator",), predictions=EPS_OR_V),
    "heun": _spec("heun", sample_heun, euler_schedule, "HeunDiscreteScheduler", two_calls_per_step=True),
    "lms": _spec("lms", sample_lms, euler_schedule, "LMSDiscreteScheduler", options=("grid", "offset")),
    "dpmpp_2m": _spec("dpmpp_2m", sample_dpmpp_2m, dpm_schedule, "DPMSolverMultistepScheduler"),
    "dpmpp_2m_sde": _spec("dpmpp_2m_sde", sample_dpmpp_2m_sde, dpm_schedule, "DPMSolverMultistepScheduler",
                          options=("generator",)),
    "unipc": _spec("unipc", sample_unipc, unipc_schedule, "UniPCMultistepScheduler"),
    "lcm": _spec("lcm", sample_lcm, lcm_schedule, "LCMScheduler", options=("boundary", "generator"), spacing=False),
    "tcd": _spec("tcd", sample_tcd, tcd_schedule, "TCDScheduler",
                 options=("lands_at", "training_sigmas", "eta", "generator"), spacing=False, eta=0.3),
}
assert list(SAMPLERS) == list(SAMPLER_LABELS)


def sampler_for(config: SchedulerConfig) -> str | None:
    """The sampler a folder's scheduler config runs by default, if ldm has it."""
    name = next((name for name, s in SAMPLERS.items() if s.diffusers_class == config.class_name), None)
    if name == "dpmpp_2m" and config.extra.get("algorithm_type") == "sde-dpmsolver++":
        return "dpmpp_2m_sde"
    return name
