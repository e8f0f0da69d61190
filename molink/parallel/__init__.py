"""Running a tensor-parallel stage: rank 0 starts the other ranks (child processes), and
before each forward broadcasts what they need (molink.parallel.commands); they follow.

The pipeline sees one node: only rank 0 talks to it. The split layers themselves are
molink.models.parallel's.
"""
