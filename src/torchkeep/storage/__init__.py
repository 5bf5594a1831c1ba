"""Where bytes go: local files with fsync and atomic rename (remote backends come later)."""
