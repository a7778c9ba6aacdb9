"""deto inside the training frameworks people already use.

Each integration is its own module, imported on demand so that deto itself needs none of
these libraries: :mod:`deto.integrations.hf` (``transformers.Trainer``),
:mod:`deto.integrations.lightning` (PyTorch Lightning) and :mod:`deto.integrations.torchtitan`.
See docs/integrations.md.
"""
