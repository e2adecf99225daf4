"""Tiled pure-torch CPU backend (fallback when the native extension is not built). Filled in next."""
