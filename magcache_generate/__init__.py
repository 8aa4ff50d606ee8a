"""magcache-generate: Wan 2.2 video generation with MagCache step skipping."""

__version__ = "0.1.0"
