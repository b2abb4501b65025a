"""The networks (DiT families, NSF-HiFiGAN vocoder), the rectified-flow sampler, and their loaders.

`load_dit(path)` reads a RIFT-SVC checkpoint and `load_vocoder(path)` an openvpi NSF-HiFiGAN;
each returns the loaded model (see `loading.py`). A new network family goes in this folder (see
README.md).
"""

from rtsvc.models.loading import LoadedDiT, load_dit, load_vocoder

__all__ = ["LoadedDiT", "load_dit", "load_vocoder"]
