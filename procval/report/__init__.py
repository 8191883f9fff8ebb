"""What is made of finished rows: statistics, paired comparisons, text and HTML reports.

:mod:`stats` holds the numbers (bootstrap intervals, exact and permutation tests, Holm);
:mod:`compare` pairs two configs' rows; :mod:`html` renders a self-contained report. Nothing
here is imported by a worker. Internal: import from ``procval``.
"""
