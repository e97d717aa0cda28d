"""Layer robustness: how much each unit of a trained network still matters.

For each unit in `layer_order` order (bottom-up), the unit's trained values are replaced by the
run's own values at initialization and the test accuracy is measured again (Zhang, Bengio &
Singer, "Are all layers created equal?"). A small drop means the unit could be re-initialized
without harm, i.e. the network's function does not rest on what that unit learned; LW's claim of
"emphasis on the lower layers" predicts larger drops low and smaller drops high.

"Initial values" are the run's values at initialization (`load_run(...).init_variables`). For
a method that reinitializes units during training (LW), that is not the fresh draw a unit last
restarted from, so a drop there also measures how far the unit is from the first init.

Only the `params` and `batch_stats` of the unit are reset (by default): LW's frozen
standardization at the unit's output (collection `norm`) is calibration, not a learned weight,
and stays as trained.
"""

from collections.abc import Callable, Sequence
from typing import Any

from reinit import transforms
from reinit import tree as tree_lib

PyTree = Any
RESET_COLLECTIONS = ("params", "batch_stats")


def reset_unit(final_variables: PyTree, init_variables: PyTree, unit: str, *,
               collections: Sequence[str] = RESET_COLLECTIONS) -> PyTree:
  """`final_variables` with the leaves of `unit` in `collections` set to `init_variables`'.

  Both trees are linen `variables` of one model ({'params': ..., 'batch_stats': ..., ...}).
  Raises ValueError (from `reinit.select`) when `unit` names no leaf.
  """
  mask = tree_lib.select(final_variables, layers=[unit])
  mask = tree_lib.map_with_path(lambda path, m: m and path.split("/")[0] in collections, mask)
  return transforms.reinitialize(final_variables, init_variables, mask)


def layer_robustness(evaluate: Callable[[PyTree], float], init_variables: PyTree,
                     final_variables: PyTree, units: Sequence[str], *,
                     collections: Sequence[str] = RESET_COLLECTIONS) -> dict:
  """Accuracy of the trained network with each unit in turn reset to its initial values.

  Args:
    evaluate: `variables -> accuracy` (e.g. test accuracy in [0, 1]).
    init_variables, final_variables: the run's variables at initialization and at the end.
    units: unit names, e.g. `reinit.layer_order(model, ...)`.
    collections: the collections a reset touches.

  Returns:
    {'accuracy': accuracy of `final_variables`, 'init_accuracy': of `init_variables`,
     'units': [{'unit', 'accuracy', 'drop' (= accuracy of final - accuracy after the reset)}]}
    with units in the given order.
  """
  accuracy = float(evaluate(final_variables))
  rows = []
  for unit in units:
    reset = reset_unit(final_variables, init_variables, unit, collections=collections)
    unit_accuracy = float(evaluate(reset))
    rows.append({"unit": unit, "accuracy": unit_accuracy, "drop": accuracy - unit_accuracy})
  return {"accuracy": accuracy, "init_accuracy": float(evaluate(init_variables)), "units": rows}
