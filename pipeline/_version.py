"""The version of tasknotes: its own module, so modules that name it (client.py's
User-Agent, report.py) do not import the package root."""

__version__ = "0.1.0"
