"""tasknotes: append notes to EMR tasks through Cobalt, and prove what happened to every row."""

__version__ = "0.1.0"
