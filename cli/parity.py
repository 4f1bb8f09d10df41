"""`ldm parity`: ldm against diffusers on the user's own weights, component by component (`ldm.tools.parity`).

Importable without torch: `add_parser` registers the subcommand, `run` imports the library when it runs.
"""

import argparse
import sys

from ldm.choices import SAMPLER_LABELS

DESCRIPTION = (
    "Load a diffusers folder or an original single-file .safetensors checkpoint with ldm and with diffusers "
    "(fp32, same device) and compare: each text tower's hidden states against transformers' on the same token "
    "ids, one UNet call and one VAE decode on the same inputs, then a whole generation with the same prompt, "
    "seed, sampler, steps and size. Prints the largest error of each against its tolerance (1e-4 relative for "
    "modules, 2/255 for images). Exit status: 0 all within tolerance, 1 not, 2 a usage error or diffusers "
    "missing. For checking a fine-tune, a merge or a change to ldm's internals.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `parity` on the `ldm` command's subparsers."""
    parser = subparsers.add_parser(
        "parity", help="compare ldm with diffusers on your weights, component by component",
        description=DESCRIPTION)
    parser.add_argument("--model", required=True,
                        help="a diffusers folder or a single-file .safetensors checkpoint (a path, or a name in "
                             "weights/)")
    parser.add_argument("--sampler", default=None, choices=list(SAMPLER_LABELS),
                        help="the sampler of the generation, run by diffusers with the scheduler of the same "
                             "algorithm (default: the model's scheduler)")
    parser.add_argument("--steps", type=int, default=10, help="steps of the generation (default: %(default)s)")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("W", "H"),
                        help="width and height in pixels (default: the model's native size)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the latents and the generation "
                                                            "(default: %(default)s)")
    parser.add_argument("--prompt", default=None,
                        help="the prompt, read literally as diffusers reads it (default: an astronaut riding a "
                             "horse)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Print the comparison table; 0 when every row is within tolerance, 1 otherwise (LdmError: the CLI's 2)."""
    from ldm.tools import parity

    report = parity.check(args.model, sampler=args.sampler, steps=args.steps,
                          size=tuple(args.size) if args.size else None, device=args.device, seed=args.seed,
                          prompt=args.prompt if args.prompt is not None else parity.DEFAULT_PROMPT,
                          log=lambda message: print(message, file=sys.stderr, flush=True))
    print(report.table())
    return report.status
