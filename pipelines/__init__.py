"""Each p2d command as a plain function (localize, mine, train, run), so scripts and the CLI share one path."""
