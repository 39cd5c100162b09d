"""The ONNX side of export: the graphs a model directory serves, written and verified.

`contract` names every graph's inputs, outputs and shapes (no torch: the variants read it too),
`export` traces the PyTorch model into those graphs, `weights` points their initializers into
model.safetensors, `directory` writes a model directory (graphs + manifest), `verify` checks it
against PyTorch (`make verify`), `kv_graphs` builds the device KV cache's edit graphs.
"""
