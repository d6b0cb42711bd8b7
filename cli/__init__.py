"""The `p2d` command line (installed as p2d.cli)."""
