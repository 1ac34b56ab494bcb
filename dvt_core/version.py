"""The version of dvt (the package, the CLI's --version, each export's manifest)."""
__version__ = "0.1.0"
