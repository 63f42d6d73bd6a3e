"""Data sets fetched in one command: ``python -m breastnet.download bach --to data/BACH``.

``fetch``: resumable HTTP downloads with a checksum; ``bach``: BACH's Zenodo record, its
licence and the layout ``data.data_dir`` takes.
"""
