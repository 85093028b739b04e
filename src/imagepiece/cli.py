"""Command-line interface: a thin layer over the library's tools."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="imagepiece",
    help="Token reduction (ImagePiece, EViT, ToMe) for timm Vision Transformers.",
    no_args_is_help=True,
    add_completion=False,
)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
