"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): anyres crops unpadded and packed with newline tokens,
so rows of a batch can hold different numbers of visual tokens. The span has no single raster grid."""
from __future__ import annotations

from .base import Adapter


class LlavaNextAdapter(Adapter):
    family = "llava_next"
