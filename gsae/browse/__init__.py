"""The latent browser: a streamed collection of examples and statistics per latent
(:mod:`gsae.browse.collect`, on fixed-size heaps: :mod:`gsae.browse.heap`), and the static
site written from it (:mod:`gsae.browse.site`)."""

from .collect import CollectConfig, Collection, collect
from .site import write_site

__all__ = ["CollectConfig", "Collection", "collect", "write_site"]
