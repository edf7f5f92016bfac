"""cahp's version, in the lowest room so that reports (`cahp.core.io.environment`) can name it."""

__version__ = "0.1.0"
