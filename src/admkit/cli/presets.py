"""``admkit presets [NAME]``: list the released configurations, or print one as JSON."""

from __future__ import annotations

import argparse
import json

from admkit.presets import get_preset, list_presets


def add_parser(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help_text,
        description="Without NAME: one line per preset. With NAME: its full configuration "
        "(published flags, merged flag set, checkpoint file, sampling defaults) as JSON.",
    )
    parser.add_argument("name", nargs="?", metavar="NAME", help="preset to print")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.name is None:
        names = list_presets()
        width = max(len(name) for name in names)
        for name in names:
            print(f"{name:<{width}}  {get_preset(name).description}")
        return 0
    print(json.dumps(get_preset(args.name).to_dict(), indent=2))
    return 0
