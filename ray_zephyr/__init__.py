"""ray-zephyr: the Zephyr alignment recipe (dSFT, dDPO, serving) on Ray."""

__version__ = "0.1.0"
