"""The model directory: the contract between export/ (which writes it) and the server (which reads it).

`manifest` describes and verifies every file (graphs, weights, tokenizer, limits, special ids);
`tokenizer` turns text into the model's ids and back. No torch and no grpc here.
"""
