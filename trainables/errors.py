"""The domain exception, in a module that imports nothing so every layer (and the plugin loader) can raise it."""

from __future__ import annotations


class SweeperError(ValueError):
    """The one domain exception: a bad input (flag, config, dataset file, checkpoint, address, plugin).

    The message is one line naming the bad value and what is valid; the CLI prints it and
    exits with code 2.
    """
