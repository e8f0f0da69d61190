"""Attention kernels over the paged KV cache, with the plain PyTorch definition they follow."""
