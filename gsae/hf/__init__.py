"""A transformers model's residual stream over streamed text: the only package of gsae that
imports transformers and datasets.

- ``hub.py``: names of models and data sets (the bundled demo, hub ids), whether the hub is
  reachable, one message for what could not be loaded
- ``models.py``: :func:`load_model`, :class:`LoadedModel`, the context length, a model's
  structure and tokenizer
- ``texts.py``: :func:`open_texts`, resumable :class:`TextSource` s (files, saved datasets, the
  hub, the demo corpus)
- ``tokens.py``: :class:`TokenStream` (documents packed into chunks, resumable) and
  :class:`TokenText` (each token's text, for display)
- ``hooks.py``: :class:`ActivationReader` and :func:`splice` / :func:`record` / :func:`lm_logits`

The device and dtype policy every command shares is :mod:`gsae.device`.
"""
