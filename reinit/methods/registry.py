"""The registry of methods: name -> plan builder `(config, units) -> Plan`.

A builder reads `epochs_per_stage`, `num_stages`, `learning_rate` and its method's own knobs
(`config.lw`, `config.llf`, ...; checked by `reinit.validation.validate`) and composes a plan
from the switches of `lw.py` and `others.py`. `units` is `reinit.layer_order(model, ...)`:
bottom-up, head last; K = len(units) - 1. Every method that reinitializes uses the same number
of stages, K + 1, capped by `num_stages`. Adding a method = a builder here and its switch.
"""

from collections.abc import Callable, Sequence
import functools

from reinit.methods import lw
from reinit.methods import others
from reinit.methods.base import Calibration, keep_all_switch, Plan

Builder = Callable[..., Plan]


def _num_stages(config, units: Sequence[str]) -> int:
  """Stages of a reinitializing method: one per unit, capped by `num_stages` (-1: no cap)."""
  if config.num_stages is None or config.num_stages == -1:
    return len(units)
  return max(1, min(int(config.num_stages), len(units)))


def repeated(config, units: Sequence[str], **plan_fields) -> Plan:
  """A plan of `_num_stages` equal stages of `epochs_per_stage` at `learning_rate`."""
  stages = _num_stages(config, units)
  return Plan(config.method, (int(config.epochs_per_stage),) * stages,
              (float(config.learning_rate),) * stages, **plan_fields)


def unit_index(spec, units: Sequence[str]) -> int:
  """A unit given by name or by index (negative counts from the top) -> its index."""
  if isinstance(spec, str) and spec.lstrip("-").isdigit():
    spec = int(spec)
  if isinstance(spec, int):
    if not -len(units) < spec < len(units):
      raise ValueError(f"llf.reset_from={spec} is out of range; accepted: a unit name in "
                       f"{list(units)} or an index in [{1 - len(units)}, {len(units) - 1}]")
    return spec % len(units)
  if spec not in units:
    raise ValueError(f"llf.reset_from={spec!r} is unknown; accepted: a unit name in "
                     f"{list(units)} or an index")
  return units.index(spec)


def baseline_plan(config, units) -> Plan:
  del units
  return Plan(config.method, (int(config.epochs_per_stage),), (float(config.learning_rate),))


def _compared_plan(config, units) -> Plan:
  other = config.copy_and_resolve_references()
  other.method = config.compare_with
  return make_plan(other, units)


def baseline_long_plan(config, units) -> Plan:
  """One schedule as long as all stages of `compare_with` together."""
  return Plan(config.method, (sum(_compared_plan(config, units).epochs),),
              (float(config.learning_rate),))


def restarts_plan(config, units) -> Plan:
  """The stages of `compare_with` without its transforms: only optimizer and schedule restart."""
  compared = _compared_plan(config, units)
  return Plan(config.method, compared.epochs, compared.learning_rates, switch=keep_all_switch)


def lw_plan(config, units, *, rescale: bool = True, normalize: bool = True) -> Plan:
  """LW (and its ablations: no rescaling, no standardization)."""
  knobs = config.lw
  switch = lw.lw_switch(units=units, rescale=bool(knobs.rescale) and rescale,
                        reset_batch_stats=bool(knobs.reset_batch_stats),
                        rescale_zero_init=bool(knobs.rescale_zero_init),
                        earlier_standardizations=knobs.earlier_standardizations,
                        rescale_batch_stats=bool(knobs.rescale_batch_stats))
  calibration = None
  if bool(knobs.normalize) and normalize:
    calibration = Calibration(batches=int(knobs.calibration_batches),
                              unit=lambda k: units[k - 1], apply=lw.calibrate_standardization)
  return repeated(config, units, begin=lw.lw_begin, switch=switch, calibration=calibration)


def head_plan(config, units) -> Plan:
  return repeated(config, units, switch=others.layers_switch(units[-1:]))


def llf_plan(config, units) -> Plan:
  """Later-layer forgetting: units[reset_from:] reinitialized every stage."""
  start = unit_index(config.llf.reset_from, units)
  return repeated(config, units, switch=others.layers_switch(
      units[start:], reset_batch_stats=bool(config.llf.reset_batch_stats)))


def ke_plan(config, units) -> Plan:
  return repeated(config, units, begin=others.ke_begin, switch=others.ke_switch(
      split_rate=float(config.ke.split_rate), granularity=config.ke.split_granularity,
      units=units))


def rand_plan(config, units) -> Plan:
  return repeated(config, units, switch=others.rand_switch(fraction=float(config.rand.fraction)))


def sp_plan(config, units) -> Plan:
  return repeated(config, units, switch=others.sp_switch(
      shrink=float(config.sp.shrink), perturb=float(config.sp.perturb),
      reset_batch_stats=bool(config.sp.reset_batch_stats)))


def dsd_plan(config, units) -> Plan:
  """Dense, sparse, dense at a lower learning rate (Han et al. 2017), in the epochs every other
  method gets (stages x epochs_per_stage), shared evenly; `num_stages` caps the phases."""
  stages = _num_stages(config, units)
  phases, total = min(3, stages), stages * int(config.epochs_per_stage)
  lr = float(config.learning_rate)
  return Plan(config.method, tuple(total // phases + (i < total % phases) for i in range(phases)),
              (lr, lr, lr * float(config.dsd.lr_factor))[:phases], begin=others.dsd_begin,
              switch=others.dsd_switch(sparsity=float(config.dsd.sparsity)),
              optimizer=others.hold_at_zero)


PLAN_BUILDERS: dict[str, Builder] = {
    "baseline": baseline_plan,
    "baseline_long": baseline_long_plan,
    "restarts": restarts_plan,
    "lw": lw_plan,
    "lw_norescale": functools.partial(lw_plan, rescale=False),
    "lw_nonorm": functools.partial(lw_plan, normalize=False),
    "head": head_plan,
    "llf": llf_plan,
    "ke": ke_plan,
    "rand": rand_plan,
    "sp": sp_plan,
    "dsd": dsd_plan,
}
METHODS = tuple(PLAN_BUILDERS)
# Methods `baseline_long` and `restarts` can match the compute of.
COMPARABLE = tuple(m for m in METHODS if m not in ("baseline_long", "restarts"))


def make_plan(config, units: Sequence[str]) -> Plan:
  """The plan of `config.method` for a model whose units are `units`.

  Raises:
    ValueError: an unknown method, or `llf.reset_from` naming no unit (names the accepted ones).
  """
  if config.method not in PLAN_BUILDERS:
    raise ValueError(f"method={config.method!r} is unknown; accepted: {', '.join(METHODS)}")
  return PLAN_BUILDERS[config.method](config, units)
