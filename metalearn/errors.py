"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class MetalearnError(Exception):
    """A problem with the user's input (config, data, checkpoint), not a bug in metalearn."""
