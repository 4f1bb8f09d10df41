"""The `ldm` command: the top parser, and each command's run. One module a command (`ldm_cli.generate`, `serve`,
`batch`, `bench`, `models` for download and info, `parity`, `tiny`) registers its arguments and, when it runs,
builds the library's settings and request, calls the library and reports. User errors → one line on stderr, exit 2."""

import argparse
import sys

from ldm.errors import LdmError
from ldm_cli import batch, bench, generate, models, parity, preprocess, serve, tiny
from ldm_cli.allocator import keep_freed_memory
from ldm_cli.options import Parser, version

# Nothing here imports torch at module level: `ldm --help` and argument errors answer at once.

COMMANDS = {"generate": generate.run, "download": models.download, "info": models.info, "serve": serve.run,
            "batch": batch.run, "bench": bench.run, "parity": parity.run, "preprocess": preprocess.run,
            "tiny": tiny.run}
GENERATING = {"generate", "serve", "batch"}  # the commands whose process keeps freed memory (`ldm_cli.allocator`)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="ldm", description="Latent diffusion in pure PyTorch.")
    parser.add_argument("--version", action="version", version=f"ldm {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = generate.add_parser(sub)
    models.add_parsers(sub)
    serve.add_parser(sub)
    batch.add_parser(sub)
    parity.add_parser(sub)
    bench.add_parser(sub)
    preprocess.add_parser(sub)
    tiny.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "generate":  # which options were given (they override a PNG's parameters)
        args.given = generate.given_options(parser, gen, argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command in GENERATING:
        keep_freed_memory()
    try:
        return COMMANDS[args.command](args) or 0
    except LdmError as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
