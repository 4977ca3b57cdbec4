"""Guard mode: the verdict-only model (`model`), image-collection scans (`collection`) and
their report (`report`)."""
