"""Token sampling on the last pipeline stage."""

from molink.sampling.sampler import SampleOutput, Sampler, SamplerInputError
from molink.sampling.state import SequenceSamplingState, TokenHistory

__all__ = ["SampleOutput", "Sampler", "SamplerInputError", "SequenceSamplingState", "TokenHistory"]
