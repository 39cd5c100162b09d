"""Training the demonstration model and measuring it: `make train`, `make eval`.

`tokenizer` trains the byte-level BPE on the corpus, `train` the Transformer, `evaluate` scores a
checkpoint (BLEU, chrF, exact match) and writes the model card, `scoring` holds the metrics that the
variants' quality gate uses too (sacreBLEU and the standard library only, no torch).
"""
