"""Data for the PoD pipeline: corpora, a locally trained tokenizer, synthetic long-context tasks.

Modules (import the one you need; this package imports nothing itself, so that
``import data.synthetic`` does not pull in ``datasets``):

- :mod:`data.text_sources`: text present on every machine (the Python standard library's sources),
  to pretrain a tiny model without network.
- :mod:`data.tokenizer`: ``train_tokenizer`` (byte-level BPE, digits split one by one) and
  ``load_tokenizer``.
- :mod:`data.synthetic`: passkey / needle-in-a-haystack prompts, training documents and the scorer.
- :mod:`data.corpus`: load local files or a Hub dataset with per-line error reports, tokenize and
  pack into fixed-length rows, cache on disk (``build_corpus``).

Convention shared by all modules: the tokenizer never adds special tokens by itself; ``data`` code
adds ``<bos>`` in front of every document (and ``<eos>`` after it when packing) explicitly, so the
same code works with a Llama tokenizer (which would add ``<bos>``) and with ours (which does not).
"""
