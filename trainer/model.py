"""The model a run trains, whichever its architecture: trainer/models/ (one file per family, `model.arch`)
re-exported under the name the trainer, the tests and the benchmarks import (`from trainer.model import ...`).
"""

from trainer.models import *  # noqa: F403
from trainer.models import __all__  # noqa: F401
from trainer.models.common import head_logits as _logits  # noqa: F401  (steps.py's chunked estimator's name)
