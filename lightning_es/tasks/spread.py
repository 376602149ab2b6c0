"""Mean and spread over seeds, as the recipes' and the benchmarks' reports print them."""

import math
import statistics


def mean_sd(values) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value); a NaN among the values makes both NaN."""
    values = [float(v) for v in values]
    if any(math.isnan(v) for v in values):
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def shown(values, digits: str = ".3f", sd_digits: str | None = None, with_range: bool = False) -> str:
    """``mean ± sd`` (the mean alone for one value; ``with_range``: then ``[min, max]``), with format specs
    ``digits`` for the mean (and the range) and ``sd_digits`` (default ``digits``) for the deviation."""
    values = [float(v) for v in values]
    mean, sd = mean_sd(values)
    text = f"{mean:{digits}}" if len(values) == 1 else f"{mean:{digits}} ± {sd:{sd_digits or digits}}"
    return f"{text} [{min(values):{digits}}, {max(values):{digits}}]" if with_range else text
