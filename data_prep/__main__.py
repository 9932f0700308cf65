"""python -m data_prep {build,merge,inspect} (console script: minimoe-prep)."""
from __future__ import annotations

import argparse
import sys

from data_prep.config import BuildConfig
from minimoe_common.cli import InputError, add_config_arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="minimoe-prep", description="Offline data preparation: documents -> "
                                     "sentences -> tokens -> [CLS] A [SEP] B [SEP] pairs -> Arrow shards + manifest.json")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build shards from input files (restart-safe: re-run to resume)",
                                description=BuildConfig.__doc__)
    add_config_arguments(build, BuildConfig)
    merge = commands.add_parser("merge", help="write manifest.json once every partition of a build has finished")
    merge.add_argument("output", help="the --output directory shared by the partitions")
    inspect = commands.add_parser("inspect", help="summary, length histogram and decoded samples of a built directory")
    inspect.add_argument("output", help="a directory with manifest.json")
    inspect.add_argument("--samples", type=int, default=3, help="decoded samples to print (default: %(default)s)")
    inspect.add_argument("--verify", action="store_true", help="check every shard's sha256 against manifest.json "
                         "(exit status 2 naming the first that differs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "build":
            from data_prep.build import build
            build(BuildConfig(**{k: v for k, v in vars(args).items() if k != "command"}))
        elif args.command == "merge":
            from data_prep.build import merge, summary_line
            print(f"wrote {args.output}/manifest.json: {summary_line(merge(args.output))}")
        else:
            from data_prep.inspect_shards import inspect_output
            inspect_output(args.output, args.samples, args.verify)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a file size limit, a read-only dir: finished shards are kept
        print(f"error: {e.filename}: {e.strerror}; shards finished so far are kept: rerun the same command to go on",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
