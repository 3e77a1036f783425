"""The `tetris` command line."""
