"""Nucleic Transformer solution package: ingest, folding, features, models, training."""
