"""The one exception class for problems the user fixes (a config, a data file, a path).

``ftflow`` shows a :class:`UserError` as one ``ftflow: <message>`` line and a
non-zero exit, without a traceback (``--debug`` shows it); any other exception
is a bug or an environment failure and keeps its traceback. Its message names
the file or setting at fault and how to fix it.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave ftflow (config, data, paths); the message says what and how to fix it."""
