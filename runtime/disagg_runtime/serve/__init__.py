"""Process entry points: one role per process (`disagg serve --role ...`) and the `--local` launcher.

Import-light on purpose (no torch here): the CLI builds its parser from `options` without loading
the engine.
"""
