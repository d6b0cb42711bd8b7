"""Domain data cards (Markdown with YAML front matter), read by p2d.cards."""
