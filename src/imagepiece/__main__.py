"""``python -m imagepiece``: the same command line as the ``imagepiece`` script."""

from .cli import main

if __name__ == "__main__":
    main()
