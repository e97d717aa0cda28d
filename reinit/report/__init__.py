"""Results -> the paper's tables and figures (the command line: `python -m launch.report`).

  runs.py        reading every results.json / analysis.json under a directory into DataFrames
  stats.py       standard error, Holm, the sign test, method vs reference (pure)
  tables.py      Table 2, Table 3 and the analysis table, as DataFrames and markdown
  figures.py     the PNG figures (matplotlib, Agg)
  provenance.py  the footer naming the code, packages and devices that made the runs

All reading and writing goes through `etils.epath`, so DIR may be `gs://...`.
"""

from reinit.report.figures import gains_by_size
from reinit.report.figures import method_colors
from reinit.report.figures import plot_compute_vs_accuracy
from reinit.report.figures import plot_gain_vs_size
from reinit.report.figures import plot_per_dataset
from reinit.report.provenance import provenance_footer
from reinit.report.provenance import provenance_items
from reinit.report.runs import ANALYSIS_FILE
from reinit.report.runs import EXTRA_KEYS
from reinit.report.runs import KEYS
from reinit.report.runs import load_analyses
from reinit.report.runs import load_runs
from reinit.report.runs import method_order
from reinit.report.runs import REFERENCES
from reinit.report.runs import RESULTS_FILE
from reinit.report.runs import keys
from reinit.report.stats import compare
from reinit.report.stats import holm
from reinit.report.stats import sign_test
from reinit.report.stats import standard_error
from reinit.report.tables import ANALYSIS_LEGEND
from reinit.report.tables import analysis_markdown
from reinit.report.tables import analysis_table
from reinit.report.tables import seed_means
from reinit.report.tables import table2
from reinit.report.tables import table2_markdown
from reinit.report.tables import table3
from reinit.report.tables import table3_markdown
