"""The offline cluster simulator: trace loaders, serving metrics, the virtual-time fleet, ``halffull simulate``."""
