"""The engine layer: onnxruntime sessions over a model directory and the running batch's KV cache.

`engine` chooses provider and variant and runs the encoder and decoder-step graphs by model name,
`graphs` holds one model's sessions, `kv_cache` the batch's cache in host memory, and
`device_kv_cache` the same in CUDA memory with its edits as the tiny graphs of `kv_graphs/`.
No grpc here.
"""
