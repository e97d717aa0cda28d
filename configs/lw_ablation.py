r"""LW's ablation of its standardization choices, on `digits` at two training-set sizes.

  python -m launch.sweep --config=configs/lw_ablation.py:size=100 --workdir=runs/lw_ablation/100
  python -m launch.sweep --config=configs/lw_ablation.py:size=300 --workdir=runs/lw_ablation/500
  python -m launch.lw_ablation runs/lw_ablation

The digits study's setting (SimpleCNN at half width, 10 epochs per stage, 7 stages), 10 seeds;
every seed draws its own class-balanced subset, the same for every variant, so variants are
compared seed by seed. Variants of `lw`: what happens to the standardizations switched on at
earlier stages (`lw.earlier_standardizations`: off, on, fold) and whether zero-initialized
leaves are rescaled (`lw.rescale_zero_init`, with off and on), beside `baseline` and `baseline_long`.
The table is in the README ("LW's standardizations: the ablation").
"""

from configs import benchmark
from configs import paper

SEEDS = tuple(range(10))
POLICIES = ("off", "on", "fold")


def _spec(arg: str | None) -> dict:
  return benchmark.parse_arg(arg, size="100", dataset="digits", model="simple_cnn", method="lw")


def get_config(arg: str | None = None):
  """The digits study's run of `method` on `size` training examples."""
  spec = _spec(arg)
  config = paper.get_config(f"study=digits,dataset={spec['dataset']},model={spec['model']},"
                            f"method={spec['method']}")
  config.train_examples = int(spec["size"])
  return config


def get_sweep(arg: str | None = None) -> list[dict]:
  """baseline, baseline_long and the 5 LW variants, each with every seed."""
  del arg
  variants = [dict(method="baseline"), dict(method="baseline_long")] + [
      {"method": "lw", "lw.earlier_standardizations": policy, "lw.rescale_zero_init": zero}
      for zero in (False, True) for policy in POLICIES
      if not (zero and policy == "fold")]  # fold rescales like off: one zero-init arm suffices
  return [dict(variant, seed=seed) for variant in variants for seed in SEEDS]
