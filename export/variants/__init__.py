"""The derived variants of a model directory (int8, fp16, optimized fp32): `python -m export.variants`.

`build` makes them from the fp32 graphs and writes their manifests, `graphs` holds the graph
rewrites (per-row int8 activations, fp16 conversion, fusion), `checks` the quality gate each must
pass first. No torch anywhere here: the images' builder runs it with onnx and onnxruntime only.
"""

from export.variants.build import VARIANTS, BuildOptions, build_variants, main

__all__ = ["VARIANTS", "BuildOptions", "build_variants", "main"]
