from sd_rest.cli import entry

entry()
