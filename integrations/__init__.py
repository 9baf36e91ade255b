"""One adapter per library, installed as ``kl_patches.integrations.<library>``; each imports its library
lazily, so importing this package imports none of them."""
