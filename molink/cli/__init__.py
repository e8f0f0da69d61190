"""Command line: ``molink serve``, ``molink stage``, ``molink status``."""
