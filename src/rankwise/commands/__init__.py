"""One module per ``rankwise`` verb; ``rankwise.cli.COMMANDS`` lists them."""
