"""Distributed dSFT and dDPO: Ray Train workers, each running a DeepSpeed (ZeRO-3 by default) engine."""
