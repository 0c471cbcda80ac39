"""TokenMinds pipelines: the ``python -m pipelines.<job>`` entry points.

Importing the package applies the quiet console defaults (``pipelines.console.apply_console_defaults``) before any
job module can import TensorFlow or JAX: ``TF_CPP_MIN_LOG_LEVEL`` by ``os.environ.setdefault`` (inherited by Beam's
worker subprocesses), and, for ``python -m pipelines.<job>``, a filter on stderr for the native start-up lines no
variable silences. ``--verbose`` on the command line skips both.
"""
from pipelines.console import apply_console_defaults as _apply_console_defaults

_apply_console_defaults()
