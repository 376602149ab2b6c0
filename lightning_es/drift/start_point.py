"""Where the drift callbacks' start weights come from, decided once for both integrations (no framework here).

Drift is measured from the weights the run started from, across resumes. With an ES engine, that is the one copy ES
keeps (``es.keep_start()``), which its checkpoints carry; a start saved by a drift callback of a version from before
ES kept it becomes ES's. Without one, each callback holds its own copy: the saved one when resuming, else the
current weights. Resuming without a saved start, drift is measured from the resumed weights, with a warning.
The callbacks bring their framework's facts: the step, ES, how to read their saved start, how to build their copy.
"""

from collections.abc import Callable, Mapping

import torch

from ..engine.start import StartWeights

RESUMED = "drift is measured from the resumed weights, not from the weights the run started from."

Saved = Mapping[str, torch.Tensor]


def start_point(
    model: torch.nn.Module,
    es,
    step: int,
    saved: Callable[[], Saved | None],
    own: Callable[[Saved | None], StartWeights],
    warn: Callable[[str], None],
    who: str,
    es_lacks: str,
    saved_lacks: str,
) -> StartWeights:
    """The start weights a drift callback of ``model`` measures from, when training begins at ``step``.

    ``es``: the ES engine (None: another trainer); ``saved``: reads the start weights the callback saved in the
    checkpoint resumed from (None: none there), called only where they are needed; ``own``: the callback's own copy,
    of the saved weights or (None) of the current ones; ``warn``: the callback's logger; ``who``: the callback, named
    in the warning; ``es_lacks`` / ``saved_lacks``: why a resumed run has no start (ES's checkpoint, the callback's).
    """
    if es is not None:
        start = es.keep_start()
        if not es.start_restored:
            weights = saved()
            if weights is not None:  # saved by a drift callback before ES kept the start weights: they become ES's
                start.load_model_state(model, weights)
                es.start_restored = True
        if step > 0 and not es.start_restored:
            warn(f"{who}: {es_lacks}: {RESUMED}")
        return start
    weights = saved()
    if weights is not None:
        return own(weights)
    if step > 0:
        warn(f"{who}: {saved_lacks}: {RESUMED}")
    return own(None)
