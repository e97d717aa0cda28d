"""The report's provenance footer: which code, packages and devices made the runs, from each
results.json's `provenance` (written by reinit/provenance.py)."""

import collections

import pandas as pd


# The order of the footer; packages not listed here follow in their recorded order.
_PROVENANCE_ORDER = ("python", "jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint",
                     "tensorflow-datasets", "tensorflow", "tensorflow-cpu", "devices", "code",
                     "XLA_FLAGS")
_NOT_RECORDED = "not recorded"


def provenance_items(provenance: dict | None) -> dict[str, str]:
  """A results.json `provenance` (reinit/provenance.py) as {name: text} for the footer; {} when
  the run recorded none. Packages that are not installed and the `reinit` version (the code
  commit says more) are left out."""
  if not provenance:
    return {}
  items = {"python": str(provenance.get("python"))}
  items.update({name: str(version) for name, version in (provenance.get("packages") or {}).items()
                if version is not None and name != "reinit"})
  devices = provenance.get("devices") or {}
  if devices:
    processes = devices.get("process_count")
    items["devices"] = (f"{devices.get('count')} × {devices.get('kind')}, {processes} "
                        f"process{'es' if processes != 1 else ''}")
  code = provenance.get("code")
  items["code"] = ("not a git checkout" if code is None else
                   code["commit"][:12] + (" (dirty tree)" if code.get("dirty") else ""))
  items["XLA_FLAGS"] = provenance.get("xla_flags") or "(none)"
  return items


def provenance_footer(runs: pd.DataFrame) -> str:
  """One line naming what made the runs: each item's distinct values over the runs, with the
  number of runs of each value when they differ (`jax 0.10.2 (30 runs), 0.10.1 (6 runs)`)."""
  per_run = list(runs["provenance"])
  names = [n for n in _PROVENANCE_ORDER if any(n in items for items in per_run)]
  names += [n for items in per_run for n in items if n not in names]
  names = list(dict.fromkeys(names))
  parts = []
  for name in names:
    # Most frequent first; ties in the order the runs were read.
    counts = collections.Counter(items.get(name, _NOT_RECORDED) for items in per_run)
    if len(counts) == 1:
      parts.append(f"{name} {next(iter(counts))}")
    else:
      parts.append(f"{name} " + ", ".join(f"{value} ({n} run{'s' if n != 1 else ''})"
                                          for value, n in counts.most_common()))
  missing = sum(1 for items in per_run if not items)
  if missing:
    parts.append(f"provenance {_NOT_RECORDED} by {missing} of {len(per_run)} runs")
  return f"Made with ({len(per_run)} runs): " + "; ".join(parts) + "."
