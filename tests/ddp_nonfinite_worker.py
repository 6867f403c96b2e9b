"""``gvsl train`` under torchrun with rank 1's loss forced to NaN at its second step.

A helper that ``tests/test_train.py`` launches with torchrun, not a test module.
The non-finite loss is injected here, by swapping the loss class the training
loop uses for one that turns rank 1's second total into NaN, so the training
code carries no test hook.
"""

from __future__ import annotations

import os

from gvsl import train as training
from gvsl.cli.main import app

NAN_RANK = 1
NAN_CALL = 2


class LossWithNaNOnOneRank(training.GVSLLoss):
    """The GVSL loss, except that rank ``NAN_RANK``'s call number ``NAN_CALL`` returns a NaN total."""

    calls = 0

    def forward(self, *args, **kwargs):
        terms = super().forward(*args, **kwargs)
        type(self).calls += 1
        if int(os.environ.get("RANK", "0")) == NAN_RANK and type(self).calls == NAN_CALL:
            terms.total = terms.total * float("nan")
        return terms


if __name__ == "__main__":
    training.GVSLLoss = LossWithNaNOnOneRank
    app()
