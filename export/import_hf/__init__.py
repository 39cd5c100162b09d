"""Import a local Hugging Face translation checkpoint into a served model directory.

`python -m export.import_hf SRC_DIR --out MODEL_DIR` reads a checkpoint directory (config.json,
model.safetensors or pytorch_model.bin, tokenizer files), maps it onto `export.model.Transformer`
and writes the project's model directory (docs/model-directory.md). Nothing is downloaded.
"""
