"""Data layer: BACH ingest, splits, stain work, tiling, patch cache and the DataModule."""
