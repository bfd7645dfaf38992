"""The strategies ``backtest`` runs, as backtesting.py ``Strategy`` classes.

backtesting.py calls ``init`` once with the whole series (indicators are computed there, each
value from bars up to its own) and ``next`` at every bar after the indicators' warm-up, where
``self.data`` and the indicators end at the current bar; a market order placed in ``next`` fills
at the next bar's open (at this bar's close with ``trade_on_close``). See
https://kernc.github.io/backtesting.py/doc/backtesting/backtesting.html#backtesting.backtesting.Strategy.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from backtesting import Strategy
from backtesting.lib import crossover

#: Data columns ``ModelSignal`` reads (backtesting.py passes extra columns through to ``data``).
P_UP_COLUMN, TARGET_COLUMN = "P_up", "Target"


def sma(values: Any, window: int) -> pd.Series:
    """Simple moving average of the last ``window`` values (NaN until ``window`` exist)."""
    return pd.Series(values).rolling(window).mean()


class SmaCrossover(Strategy):  # type: ignore[misc]  # backtesting.py is untyped
    """Long on the fast SMA crossing above the slow one; close (and go short) on the reverse.

    backtesting.py's ``SmaCross`` example (its README and quick-start), with parameters.
    """

    fast_window = 10
    slow_window = 20
    allow_short = True

    def init(self) -> None:
        close = self.data.Close
        self.fast = self.I(sma, close, self.fast_window, name=f"SMA({self.fast_window})")
        self.slow = self.I(sma, close, self.slow_window, name=f"SMA({self.slow_window})")

    def next(self) -> None:
        if crossover(self.fast, self.slow):
            self.position.close()
            self.buy()
        elif crossover(self.slow, self.fast):
            self.position.close()
            if self.allow_short:
                self.sell()


class ModelSignal(Strategy):  # type: ignore[misc]
    """Holds the position the model asks for at each bar: 1 long, -1 short, 0 flat.

    The ``P_up`` and ``Target`` data columns are computed before the run, each value from bars
    up to its own (:mod:`.model_signals`); ``next`` at bar ``t`` reads the value at ``t`` only.
    """

    def init(self) -> None:
        self.p_up = self.I(lambda: self.data[P_UP_COLUMN], name="P(up)", overlay=False)
        self.target = self.I(lambda: self.data[TARGET_COLUMN], name="target", plot=False)

    def next(self) -> None:
        target = self.target[-1]
        if target > 0 and not self.position.is_long:
            self.position.close()
            self.buy()
        elif target < 0 and not self.position.is_short:
            self.position.close()
            self.sell()
        elif target == 0 and self.position:
            self.position.close()
