"""Table stores: where looked-up rows come from (``local`` mmap of the bundle's part files; an
in-memory store over the weights, for the build's own checks)."""
