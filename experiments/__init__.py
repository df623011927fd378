"""Command-line experiments: absl flags -> `maxrec.Config` -> library calls."""
