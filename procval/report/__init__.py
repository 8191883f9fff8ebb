"""What is made of finished rows: statistics, paired comparisons, text and HTML reports.

:mod:`stats` holds the numbers (bootstrap intervals, exact and permutation tests, Holm);
:mod:`compare` pairs two configs' rows; :mod:`text` prints a comparison for a terminal;
:mod:`markup` holds the HTML pieces (escaping, cells, inline SVG) that :mod:`html` (the
self-contained report page) and :mod:`notebook` (the ``_repr_html_`` views) are made of;
:mod:`protocol` says what the report reads from a result. The report never imports
:mod:`procval.results` (results call into the report, not the reverse), and nothing here is
imported by a worker. Internal: import from ``procval``.
"""
