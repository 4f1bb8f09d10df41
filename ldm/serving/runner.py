"""A parsed scoring request (`ldm.serving.schema`) run through the pipeline: its rows in order, consecutive
text-to-image rows together in one pass where they can share it, each row's images or its error in the response.
`ldm serve` and `ldm batch` both run requests here.
"""

import logging
from collections.abc import Callable

from ldm.errors import LdmError
from ldm.pipelines.images import encode_png, fit_size
from ldm.pipelines.prompts import extract_extra_networks
from ldm.serving.limits import Limits
from ldm.serving.schema import (
    Request,
    RequestError,
    Row,
    echo,
    error_object,
    generation_request,
    hires_too_large,
    negative_prompt,
    parse,
    respond,
    row_seed,
    too_many_pixels,
)

log = logging.getLogger("ldm.serving.runner")


class Cancelled(Exception):
    """The client went away: the work for it stops at the next step."""


def run_rows(pipe, request: Request, rows: list[Row], cancelled: Callable[[], bool] | None = None) -> list[dict]:
    """The response objects of some rows: one per image, or one carrying a row's error. Several error-free
    text-to-image rows go through the pipeline as one batch, each with its own seed, so each image is the one
    the row gets alone (up to float rounding of a batched matmul). The rows of a pass share one negative prompt
    (`run` groups them so)."""
    if len(rows) == 1 and rows[0].error is not None:
        return [error_object(rows[0], rows[0].error)]
    negative = negative_prompt(request, rows[0])
    if any(negative_prompt(request, row) != negative for row in rows):
        raise ValueError("rows of different negative prompts cannot share a pass")
    p = request.parameters
    seeds = [row_seed(request, row) for row in rows]
    native = pipe.native_size
    first = rows[0]
    width, height = fit_size(first.image) if first.image is not None else (native, native)
    width, height = p.width or width, p.height or height
    if error := too_many_pixels("parameters.width", width, height, request.limits,
                                ": give a smaller width and height"):
        return [error_object(row, error) for row in rows]
    if first.image is None and (error := hires_too_large(p, width, height, request.limits, pipe.vae_scale)):
        return [error_object(row, error) for row in rows]
    if len(first.control_images) != len(p.controlnet):
        return [error_object(row, RequestError(f"data[{row.position}].control_image",
                                               f"{len(row.control_images)} control images for "
                                               f"{len(p.controlnet)} ControlNet units (parameters.controlnet)"))
                for row in rows]

    def cancel_check(step) -> None:
        if cancelled is not None and cancelled():
            raise Cancelled()

    try:
        result = pipe(generation_request(p, [row.prompt for row in rows], negative, first.image, first.mask,
                                         seeds if len(rows) > 1 else seeds[0], request.prompt_syntax,
                                         first.control_images, first.ip_images), callbacks=[cancel_check])
    except LdmError as e:  # a bad value for this model, or a LoRA, ControlNet or IP-Adapter that does not fit it
        return [error_object(row, RequestError(f"data[{row.position}]", str(e))) for row in rows]
    except Cancelled:
        raise
    except Exception as e:  # a bug, or an input nothing above foresaw: these rows fail (logged), the others run
        log.exception("rows %s failed", [row.position for row in rows])
        return [error_object(row, RequestError(f"data[{row.position}]", f"internal error ({type(e).__name__}: "
                                                                        f"{e}); the row could not run"))
                for row in rows]
    n = p.num_images_per_prompt

    def notes(row: Row) -> dict:
        """What the client should know of its row (a plain prompt cut at 77 tokens): the notes that name its
        prompt or the negative prompt, each cut to 500 characters (the cut one repeats what was dropped)."""
        texts = [repr(t[:30]) for t in (row.prompt, negative) if t]
        mine = [echo(note, 500) for note in result.notes if any(t in note for t in texts)]
        return {"notes": mine} if mine else {}

    return [{"prompt": rows[i // n].prompt, "generated_image": encode_png(image, text), "nsfw_content_detected": nsfw,
             "seed": seeds[i // n]} | notes(rows[i // n])
            for i, (image, text, nsfw) in enumerate(zip(result.images, result.infotexts, result.nsfw, strict=True))]


def run_row(pipe, request: Request, row: Row, cancelled: Callable[[], bool] | None = None) -> list[dict]:
    return run_rows(pipe, request, [row], cancelled)


def run(pipe, request: Request, cancelled: Callable[[], bool] | None = None, batch_size: int = 1):
    """Every row of a parsed request, in order, as the response body. Consecutive text-to-image rows go
    through the networks together (they share the request's parameters), up to `batch_size` images a pass;
    a row with more images than that still runs, alone."""
    if request.parameters.refiner_start is not None and not hasattr(pipe, "refiner"):
        raise RequestError("parameters.refiner_start", f"this server runs {pipe.name} without a refiner (ldm serve "
                                                       "--refiner MODEL)")
    per_row = request.parameters.num_images_per_prompt
    rows_per_pass = max(1, batch_size // per_row)
    objects, group = [], []

    def kind(row: Row) -> tuple:
        """Rows of a pass must have equally many chunks (a batch pads every prompt to the longest one's, which
        would change the images of the shorter ones), the same <lora:…> tags (merged for the whole pass) and the
        same negative prompt (one for the pass)."""
        tags, negative = extract_extra_networks(row.prompt)[1], negative_prompt(request, row)
        try:
            return pipe.chunk_count(row.prompt, request.prompt_syntax), tags, negative
        except Exception:  # (an InputError, or worse)
            return -1, tags, negative  # runs alone, and reports its error

    group_kind = None
    for row in request.rows:
        if row.error is None and row.image is None and not row.control_images and not row.ip_images \
                and rows_per_pass > 1:  # (a row's own images are not the pass's: it runs alone)
            row_kind = kind(row)
            if group and row_kind != group_kind:
                objects += run_rows(pipe, request, group, cancelled)
                group = []
            group.append(row)
            group_kind = row_kind
            if len(group) == rows_per_pass:
                objects += run_rows(pipe, request, group, cancelled)
                group = []
            continue
        if group:
            objects += run_rows(pipe, request, group, cancelled)
            group = []
        objects += run_rows(pipe, request, [row], cancelled)
    if group:
        objects += run_rows(pipe, request, group, cancelled)
    return respond(objects, request.form)


def score(pipe, body, limits: Limits = Limits(), form: str = "rows", cancelled: Callable[[], bool] | None = None,
          batch_size: int = 1):
    """Parse and run a request body. Raises RequestError for a request that cannot be read."""
    return run(pipe, parse(body, limits, form), cancelled, batch_size)
