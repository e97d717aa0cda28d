"""Memorization of corrupted training labels.

With a fraction of training labels replaced by wrong ones (`label_noise`), a network that fits
the corrupted examples by their *corrupted* label has memorized them; one that predicts their
*true* label there has learned a rule that overrides the noise. The paper claims LW "encourages
general rules and discourages memorization"; these counts measure it on the training set.
"""

import numpy as np


def memorization_metrics(predictions, labels, true_labels, corrupted, mask=None) -> dict:
  """Training-set fit split into corrupted and clean examples.

  Args:
    predictions: int (N,) predicted class (argmax of the logits) per training example.
    labels: int (N,) the labels trained on (the corrupted label on corrupted examples).
    true_labels: int (N,) the original labels.
    corrupted: bool (N,) whether the example's label was corrupted.
    mask: optional (N,) 1 for real examples, 0 for padding (dropped).

  Returns:
    Fractions in [0, 1] (NaN over an empty group) and counts:
      memorized: corrupted examples predicted as their corrupted label;
      corrupted_true_accuracy: corrupted examples predicted as their true label;
      clean_accuracy: clean examples predicted as their (true) label;
      train_accuracy: all examples predicted as the label trained on;
      corrupted_examples, clean_examples: counts.
  """
  keep = np.ones(len(predictions), bool) if mask is None else np.asarray(mask) > 0
  predictions, labels = np.asarray(predictions)[keep], np.asarray(labels)[keep]
  true_labels, corrupted = np.asarray(true_labels)[keep], np.asarray(corrupted, bool)[keep]
  clean = ~corrupted

  def fraction(hits, group):
    return float(np.mean(hits[group])) if group.any() else float("nan")

  return {
      "memorized": fraction(predictions == labels, corrupted),
      "corrupted_true_accuracy": fraction(predictions == true_labels, corrupted),
      "clean_accuracy": fraction(predictions == true_labels, clean),
      "train_accuracy": fraction(predictions == labels, np.ones_like(clean)),
      "corrupted_examples": int(corrupted.sum()),
      "clean_examples": int(clean.sum()),
  }
