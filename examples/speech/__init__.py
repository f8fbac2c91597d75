"""A DeepSpeech2-like speech recognizer whose recurrent layers are pruned and run in jax_sprnn.

Modules, one job each:

* ``make_corpus``: synthesize the embedded corpus (or a larger one) with espeak-ng.
* ``text``: the character alphabet, transcript normalization, greedy CTC decoding, CER/WER.
* ``data``: corpus readers (embedded, LibriSpeech folders, manifests), audio loading,
  augmentation, and length-bucketed batches.
* ``features``: log-mel features in JAX.
* ``model``: the acoustic model (convolutional subsampling, sparse recurrent stack, CTC head)
  and the conversion of its trained parameters to the packed inference form.
* ``train``: the training loop with gradual pruning, checkpoints and evaluation.
* ``bench``: inference timing of the recurrent layers and the whole model.
* ``report``: the JSON of results and the plots.

``examples/speech_model.py`` is the command line that ties them together; docs/speech.md
describes the whole example.
"""
