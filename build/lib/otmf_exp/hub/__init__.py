"""Where models and datasets come from: hub ids resolved to local caches or directories, and prefetch."""
