"""Model families: one module per family, each exposing a `ModelFamily`."""
