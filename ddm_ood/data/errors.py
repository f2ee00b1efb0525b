"""The one exception type of the data package, and its optional-dependency import."""

import importlib


class DataError(ValueError):
  """A user-facing data problem; the message says what was wrong and what to do."""


def require(module: str, what: str, package: str):
  """Imports ``module`` (an optional dependency) or raises DataError naming how to install it.

  Args:
    module: e.g. 'sklearn.datasets'.
    what: the source that needs it, e.g. "Source 'digits'".
    package: the pip package(s), e.g. 'scikit-learn'.
  """
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise DataError(f'{what} needs {package}: `pip install {package}`.') from e
