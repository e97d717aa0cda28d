"""The training subset and its label noise, as pure numpy functions of labels and seeds.

Both depend only on the split's labels, the subset size, the number of classes and the subset
seed (and the noise fraction), never on the method, batch size or process count, so every
method of a comparison trains on the same examples with the same labels.
"""

from __future__ import annotations

import numpy as np

# Second entropy word of the label-noise generator: a stream independent of the
# subset choice, which uses the bare seed.
_NOISE_STREAM = 1


def requested_train_examples(
    train_examples: int | None, train_fraction: float | None, split_size: int
) -> int | None:
  """`train_examples` (or `train_fraction` of the split); None means all."""
  if train_examples is not None and train_examples != -1:
    return int(train_examples)
  if train_fraction is not None:
    return int(round(float(train_fraction) * split_size))
  return None


def check_train_examples(train_examples: int, *, num_classes: int, upper: int) -> None:
  if not num_classes <= train_examples <= upper:
    raise ValueError(
        f"train_examples={train_examples} is out of range: accepted are "
        f"{num_classes}..{upper} (class-balanced), or None / -1 for the whole "
        f"split."
    )


def check_label_noise(noise) -> float:
  """`label_noise` as a float; ValueError unless it is a number in [0, 1)."""
  is_number = isinstance(noise, (int, float)) and not isinstance(noise, bool)
  if not is_number or not 0 <= noise < 1:
    raise ValueError(
        f"label_noise={noise!r} is invalid; accepted: a float in [0, 1)"
    )
  return float(noise)


def num_corrupted(train_examples: int, label_noise: float) -> int:
  """Number of training labels that `label_noise` replaces: round(noise * n)."""
  return int(round(label_noise * train_examples))


def train_subset_indices(
    labels: np.ndarray,
    *,
    train_examples: int | None,
    num_classes: int,
    seed: int,
) -> np.ndarray:
  """Indices of a class-balanced, seed-determined training subset.

  Each class gets `train_examples // num_classes` examples; the remainder goes
  one each to classes drawn by the seed. Examples within a class are drawn by
  `np.random.default_rng(seed)`, so the subset depends only on (labels,
  train_examples, num_classes, seed), never on the method or batch size.

  Args:
    labels: int (N,) class of each example of the split, in split order.
    train_examples: subset size; None, -1 or N = the whole split.
    num_classes: number of classes; labels lie in 0..num_classes-1.
    seed: seed of the choice.

  Returns:
    int64 (train_examples,) sorted indices into `labels`.

  Raises:
    ValueError: `train_examples` is below `num_classes`, above the split size,
      or needs more examples of some class than the split holds.
  """
  labels = np.asarray(labels)
  size = len(labels)
  if train_examples is None or train_examples == -1 or train_examples == size:
    return np.arange(size, dtype=np.int64)
  counts = np.bincount(labels, minlength=num_classes)[:num_classes]
  per_class, remainder = divmod(train_examples, num_classes)
  balanced_max = num_classes * int(counts.min())
  check_train_examples(
      train_examples, num_classes=num_classes, upper=min(size, balanced_max)
  )
  rng = np.random.default_rng(seed)
  extra = np.zeros(num_classes, dtype=np.int64)
  extra[rng.choice(num_classes, size=remainder, replace=False)] = 1
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    # per_class + 1 <= counts.min() whenever there is a remainder, so every
    # class has enough members (checked above).
    chosen.append(rng.choice(members, size=per_class + extra[c], replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def corrupt_labels(
    labels: np.ndarray,
    subset: np.ndarray,
    *,
    num_classes: int,
    label_noise: float,
    seed: int,
) -> np.ndarray:
  """The split's labels after label noise on a seeded fraction of the subset.

  `num_corrupted(len(subset), label_noise)` examples of `subset` get the label
  `(y + s) % num_classes` with s uniform in 1..num_classes-1, i.e. a class drawn
  uniformly from the other classes. The permutation that picks them and the
  shifts are drawn for the whole subset before `label_noise` is looked at, so
  the result depends only on (labels, subset, num_classes, seed, label_noise),
  never on the method, and a larger `label_noise` corrupts a superset of the
  examples (with the same new labels) that a smaller one does.

  Args:
    labels: int (N,) true class of each example of the split, in split order.
    subset: int (n,) indices into `labels` of the training subset.
    num_classes: number of classes; labels lie in 0..num_classes-1.
    label_noise: fraction in [0, 1) of the subset to corrupt.
    seed: seed of the choice (the subset seed).

  Returns:
    int64 (N,) labels: equal to `labels` except at the corrupted indices.
  """
  labels = np.asarray(labels, dtype=np.int64)
  subset = np.asarray(subset, dtype=np.int64)
  noisy = labels.copy()
  count = num_corrupted(len(subset), label_noise)
  if count == 0:
    return noisy
  if num_classes < 2:
    raise ValueError(
        f"label_noise={label_noise} is invalid with num_classes={num_classes}; "
        "accepted: 0 (no other class to draw from)"
    )
  rng = np.random.default_rng([seed, _NOISE_STREAM])
  order = rng.permutation(len(subset))
  shifts = rng.integers(1, num_classes, size=len(subset))
  chosen = order[:count]
  noisy[subset[chosen]] = (labels[subset[chosen]] + shifts[chosen]) % num_classes
  return noisy
