"""Adapters for other libraries. Each submodule imports its library lazily (optional extras):

* :mod:`tripletlab.integrations.sentence_transformers` — :class:`TripletLoss` for
  ``SentenceTransformerTrainer`` (extra ``[text]``).
"""
