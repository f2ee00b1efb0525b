"""The one exception type of the data package."""


class DataError(ValueError):
  """A user-facing data problem; the message says what was wrong and what to do."""
