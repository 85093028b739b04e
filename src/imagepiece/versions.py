"""The timm and transformers versions imagepiece supports, checked when a model is patched.

Both adapters reach into the libraries' module layout (timm's ``Attention.attn_dim``, the
``layers`` of a transformers encoder), so a version outside the range fails deep inside a
forward pass with an ``AttributeError`` that names neither version. :func:`check` turns that
into one clear message before anything is changed.

Policy: the floor is the oldest release CI tests (``.ci/run`` installs exactly it); the upper
bound is the next major version, exclusive. Each CI run installs the newest release below that
bound, so the top of the range is the latest release at the time of the run; a new major
version is refused until it has been tested and the bound raised. The same bounds are declared
in ``pyproject.toml`` (a test keeps the two equal).
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

# package -> (lowest supported version, first unsupported version)
SUPPORTED: dict[str, tuple[str, str]] = {
    "timm": ("1.0.23", "2"),
    "transformers": ("5.18", "6"),
}


class UnsupportedVersionError(ImportError):
    """The installed timm or transformers is outside the range imagepiece supports."""


def supported_range(package: str) -> str:
    """``"transformers >= 5.18, < 6"``: the supported range of ``package`` in words."""
    low, high = SUPPORTED[package]
    return f"{package} >= {low}, < {high}"


def check(package: str, installed: str) -> None:
    """Raise :class:`UnsupportedVersionError` naming the installed and the supported versions
    when ``installed`` (the package's ``__version__``) is outside its supported range."""
    low, high = SUPPORTED[package]
    try:  # a pre-release of the next major version (6.0.0rc1) is outside too
        ok = Version(low) <= Version(installed) and Version(Version(installed).base_version) < Version(high)
    except InvalidVersion:
        ok = False
    if not ok:
        raise UnsupportedVersionError(
            f"{package} {installed} is installed, but imagepiece supports {supported_range(package)}; "
            f'install a supported one: pip install "{package}>={low},<{high}"')
