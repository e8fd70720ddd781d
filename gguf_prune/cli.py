"""The command line: a thin click layer, one library call per command."""

from __future__ import annotations

import logging
import sys

import click


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(message)s" if verbose == 0 else "%(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        for noisy in ("httpx", "urllib3", "matplotlib", "PIL"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="gguf-prune")
def main(verbose: int) -> None:
    """Measure what each part of a Hugging Face causal LM does, cut the parts that
    matter least, and write a GGUF that stock llama.cpp runs.

    Stages: score → plan → prune (or rewrite) → eval → package; `run` does them all.
    """
    _setup_logging(verbose)


@main.command()
def doctor() -> None:
    """Report the pinned llama.cpp, bindings, tools, torch and the demo model."""
    from .doctor import diagnose

    report = diagnose()
    width = max(len(c.name) for c in report.checks)
    for c in report.checks:
        click.echo(f"{'ok' if c.ok else 'BAD':3}  {c.name:<{width}}  {c.detail}")
    if not report.ok:
        names = ", ".join(c.name for c in report.problems())
        click.echo(f"\nerror: not ready: {names}. Run scripts/setup.sh from the gguf-prune checkout.", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
