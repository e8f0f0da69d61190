"""Quantized weights: decoding checkpoint formats, packing for kernels, quantized layers.

``groups`` holds the neutral form (integers, scales, offsets) every format decodes into;
``gguf_blocks`` and ``awq_gptq`` decode; ``int4`` packs for torch's CPU int4 kernel;
``linear`` runs it; ``config`` resolves ``--quantization`` / ``--kv-cache-dtype``.
"""
