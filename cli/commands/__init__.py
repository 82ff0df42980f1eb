"""One module per command or closely related group; each has `register(app)`, called by `cli.app`."""
