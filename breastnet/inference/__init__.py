"""The trained pipeline on images: its models, new files, ``Trainer.predict`` on every rank.

``models`` loads a config's trained models, ``files`` makes new image files ready for them,
``embedder`` is the LightningModule ``Trainer.predict`` runs, ``runner`` runs it with
resumable per-image parts, ``ensemble`` the models predict averages, ``checks`` what the
inputs are to the model and ``results`` the report's view of the outputs. Nothing is
imported here: the models package needs ``embedder``'s neighbours without a cycle.
"""
