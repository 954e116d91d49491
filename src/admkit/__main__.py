from admkit.cli import entry_point

entry_point()
