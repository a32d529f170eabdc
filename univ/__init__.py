"""univ: find universal neurons across language-model seeds, and explain what they do.

The streaming correlation kernels live in the standalone package ``univ_kernels``; this package is the
analysis layer around them: models, data, the correlate run, selection, profiles, roles and the report.
"""

__version__ = "0.1.0"
