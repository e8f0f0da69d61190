"""Tensor-parallel layers: matrices split across the ranks of one stage, which add their
partial sums with ``torch.distributed`` collectives; which rows or columns of a checkpoint
each rank reads; and the checks a tensor-parallel size must pass. Starting and driving
the ranks is molink.parallel's.
"""
