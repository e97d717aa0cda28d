"""Reinitialization methods as plans of stages built from the public transforms.

  base.py      `Plan` (what the trainer knows of a method), `Switched`, `Calibration`, masks
  lw.py        LW's switch, rescaling, standardization folding and calibration
  others.py    the compared methods' switches, and DSD's optimizer wrapper `hold_at_zero`
  registry.py  name -> plan builder (`PLAN_BUILDERS`), `make_plan`, `METHODS`

The trainer draws `fresh = model.init(fold_in(key, k), ...)` before stage k >= 1, calls the
plan's switch, runs its calibration if it has one, wraps its optimizer with `plan.optimizer`,
and trains; it knows no method by name.
"""

from reinit.methods.base import Calibration
from reinit.methods.base import keep_all_switch
from reinit.methods.base import Plan
from reinit.methods.base import Switched
from reinit.methods.base import unit_mask
from reinit.methods.lw import calibrate_standardization
from reinit.methods.lw import changed
from reinit.methods.lw import deactivate_standardizations
from reinit.methods.lw import FOLDABLE_MODELS
from reinit.methods.lw import fold_standardizations
from reinit.methods.lw import init_norms
from reinit.methods.lw import kernel_scales
from reinit.methods.lw import lw_begin
from reinit.methods.lw import lw_switch
from reinit.methods.lw import lw_transform
from reinit.methods.lw import scale_batch_stats
from reinit.methods.lw import set_standardization
from reinit.methods.lw import STANDARDIZATION_POLICIES
from reinit.methods.lw import unit_moments
from reinit.methods.others import dsd_begin
from reinit.methods.others import dsd_switch
from reinit.methods.others import hold_at_zero
from reinit.methods.others import ke_begin
from reinit.methods.others import ke_fit_mask
from reinit.methods.others import ke_switch
from reinit.methods.others import kels_mask
from reinit.methods.others import layers_switch
from reinit.methods.others import rand_switch
from reinit.methods.others import sp_switch
from reinit.methods.registry import COMPARABLE
from reinit.methods.registry import make_plan
from reinit.methods.registry import METHODS
from reinit.methods.registry import PLAN_BUILDERS
