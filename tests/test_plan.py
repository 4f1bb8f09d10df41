"""`make_plan`: a request resolved against a family's spec, with no network and no weights (the specs come from the
registry, the scheduler config from the family's official one)."""

import pytest
import torch
from PIL import Image

from ldm.errors import InputError
from ldm.loading.families import SPECS
from ldm.pipelines.plan import make_plan
from ldm.pipelines.request import GenerationRequest
from ldm.sampling.samplers import SAMPLERS
from ldm.sampling.schedules import SchedulerConfig

VAE_SCALE = 8  # every family's VAE halves the size three times


def plan_for(family: str, vae_scale: int = VAE_SCALE, **request):
    spec = SPECS[family]
    scheduler = SchedulerConfig.from_diffusers(spec.scheduler)
    return make_plan(spec, GenerationRequest("a lighthouse", **{"seed": 1, "steps": 10} | request), scheduler,
                     vae_scale, name=f"tiny-{family}")


def test_the_registry_flags_sdxl_the_refiner_and_inpainting():
    assert all(key == spec.key for key, spec in SPECS.items())
    flags = {key: (spec.xl, spec.refiner, spec.inpainting) for key, spec in SPECS.items()}  # (xl, refiner, inpainting)
    assert flags["sd1"] == flags["sd2"] == (False, False, False) and flags["sd2-inpaint"] == (False, False, True)
    assert flags["sdxl"] == (True, False, False) and flags["sdxl-refiner"] == (True, True, False)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_text_to_image_defaults_come_from_the_spec(family):
    spec = SPECS[family]
    r = plan_for(family).request
    native = spec.sample_size * VAE_SCALE  # the native size: the UNet's sample size × the VAE's scale
    assert (r.width, r.height) == (native, native)
    # the default sampler is the one that runs the family's official scheduler class
    assert SAMPLERS[r.sampler].diffusers_class == spec.scheduler["_class_name"]


def test_native_sizes_and_samplers_differ_by_family():
    """(So that the test above would catch one family's defaults used for another.)"""
    assert len({SPECS[k].sample_size for k in ("sd1", "sd2", "sdxl")}) == 3
    assert len({plan_for(k).request.sampler for k in ("sd1", "sd2", "sdxl")}) == 3


def test_image_to_image_strength_defaults_to_the_familys():
    image = Image.new("RGB", (64, 48))
    sd, xl = plan_for("sd1", image=image).request, plan_for("sdxl", image=image).request
    assert SPECS["sd1"].default_strength != SPECS["sdxl"].default_strength
    assert sd.strength == SPECS["sd1"].default_strength and xl.strength == SPECS["sdxl"].default_strength
    assert (sd.width, sd.height) == (64, 48)  # the image's size, not the native one


def test_inpainting_strength_defaults_to_one():
    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    assert plan_for("sd2-inpaint", image=image, mask=mask).request.strength == 1.0
    assert plan_for("sd1", image=image, mask=mask, sampler="euler").request.strength == 1.0


@pytest.mark.parametrize("steps, strength", [(10, 0.55), (20, 0.3), (7, 1.0)])
def test_strength_keeps_int_steps_times_strength_steps(steps, strength):
    """diffusers' img2img rule: the last int(steps × strength) steps of the schedule run."""
    plan = plan_for("sd1", sampler="euler", steps=steps, strength=strength, image=Image.new("RGB", (64, 64)))
    assert len(plan.schedule.timesteps) == int(steps * strength)
    full = plan_for("sd1", sampler="euler", steps=steps).schedule
    assert plan.schedule.sigmas == full.sigmas[steps - int(steps * strength):]  # the tail of the full grid


def test_a_size_the_vae_does_not_divide_is_refused():
    assert plan_for("sd1", vae_scale=16, width=512).request.width == 512
    with pytest.raises(InputError, match="width must be a positive multiple of 16") as e:
        plan_for("sd1", vae_scale=16, width=520)  # a multiple of 8 (the request's own check), not of 16
    assert e.value.field == "width"


def test_the_latents_shape_follows_the_spec_and_the_vae_scale():
    spec = SPECS["sdxl"]
    plan = plan_for("sdxl", width=256, height=128, num_images=2)
    assert plan.shape == (2, spec.latent_channels, 128 // VAE_SCALE, 256 // VAE_SCALE)


def test_an_inpainting_model_without_a_mask_is_refused():
    with pytest.raises(InputError, match="is an inpainting model") as e:
        plan_for("sd2-inpaint", image=Image.new("RGB", (64, 64)))
    assert e.value.field == "mask"
    plan_for("sd1", image=Image.new("RGB", (64, 64)))  # a 4-channel model runs image-to-image without one


def test_an_inpainting_unet_fitted_to_a_family_is_an_inpainting_model():
    """SD 1.x inpainting is SD 1.x with a 9-channel UNet: the model's spec says so once its configs are read."""
    spec = SPECS["sd1"].with_model(unet_in_channels=9)
    assert spec.inpainting and spec.label == "SD 1.x inpainting" and not SPECS["sd1"].inpainting
    with pytest.raises(InputError, match=r"9-channel UNet"):
        make_plan(spec, GenerationRequest("a lighthouse", seed=1), SchedulerConfig.from_diffusers(spec.scheduler),
                  VAE_SCALE)


def test_heun_with_a_refiner_cut_is_refused():
    with pytest.raises(InputError, match="heun: diffusers cuts the schedule") as e:
        plan_for("sdxl", sampler="heun", denoising_end=0.8)
    assert e.value.field == "sampler"
    plan_for("sdxl", sampler="heun")  # without the cut it runs
    plan_for("sdxl", sampler="euler", denoising_end=0.8)  # and the cut runs with a one-call sampler


def test_heun_with_a_pasted_known_region_is_refused():
    """Inpainting with a 4-channel UNet pastes the known region after every call; a 9-channel one does not."""
    image, mask = Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 255)
    with pytest.raises(InputError, match="heun"):
        plan_for("sd1", sampler="heun", image=image, mask=mask)
    plan_for("sd2-inpaint", sampler="heun", image=image, mask=mask)


def test_a_refiner_hand_off_point_needs_a_refiner():
    with pytest.raises(InputError, match="runs without a refiner") as e:
        plan_for("sdxl", refiner_start=0.8)
    assert e.value.field == "refiner_start"


def test_latents_of_another_channel_count_are_refused():
    channels = SPECS["sd1"].latent_channels
    plan_for("sd1", latents=torch.zeros(1, channels, 8, 8), denoising_start=0.5, sampler="euler")
    with pytest.raises(InputError, match="do not fit") as e:
        plan_for("sd1", latents=torch.zeros(1, channels + 1, 8, 8), denoising_start=0.5, sampler="euler")
    assert e.value.field == "latents"


def test_the_text_layer_rule_is_the_familys():
    """SD 1.x/2.x: the last layer through the final LayerNorm, clip skip N layer -N; SDXL: the penultimate
    without it, clip skip N layer -(N+1)."""
    for clip_skip in (1, 2, 3):
        assert SPECS["sd1"].text_layer(clip_skip) == (-clip_skip, True)
        assert SPECS["sd2"].text_layer(clip_skip) == (-clip_skip, True)
        assert SPECS["sdxl"].text_layer(clip_skip) == (-clip_skip - 1, False)
        assert SPECS["sdxl-refiner"].text_layer(clip_skip) == (-clip_skip - 1, False)
