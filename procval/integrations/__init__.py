"""Optional integrations with other libraries, each imported only when first used.

``procval.dspy`` maps to :mod:`procval.integrations.dspy` (needs ``pip install 'procval[dspy]'``).
Nothing here is imported by ``import procval``.
"""
