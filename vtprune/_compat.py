"""The transformers versions vtprune's hooks were written and tested against."""

from __future__ import annotations

SUPPORTED = ((5, 20), (6, 0))  # [5.20, 6.0): mm_encoder_outputs, layer keyword `cache`, M-RoPE in the rotary


def _parse(version: str) -> tuple[int, int]:
    parts = version.split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def check_transformers(version: str | None = None) -> None:
    if version is None:
        import transformers

        version = transformers.__version__
    lo, hi = SUPPORTED
    if not lo <= _parse(version) < hi:
        raise ImportError(
            f"vtprune supports transformers >= {lo[0]}.{lo[1]}, < {hi[0]}.{hi[1]}; found {version}. "
            f"Install a supported release: pip install 'transformers>={lo[0]}.{lo[1]},<{hi[0]}'"
        )
