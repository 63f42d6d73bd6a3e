"""Data layer: BACH ingest, splits, stain work, tiling, patch cache, building them (prepare)
and the DataModule."""
