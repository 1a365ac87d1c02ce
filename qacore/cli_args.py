"""Command-line parsing shared by every CLI of the project: a usage error is one line, never the whole usage."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2  # bad flags or input: the same status for every CLI


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the usage text is in --help), exit status 2.

    Subcommand parsers made with `add_subparsers().add_parser` inherit this class.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
