"""OHLCV bars for ``train_model``: loading, validation, look-ahead-free features, splitting.

Every feature of the sample that ends at bar ``t`` is computed from bars ``<= t`` only; the target
is the direction of bar ``t + 1``. Standardisation statistics come from the training part only, and
the split is chronological (validation is the most recent part), so nothing from the validation
period leaks into what the model is fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from shared.task_types import BUNDLED_DATASETS

FloatArray = npt.NDArray[np.float32]

#: Columns every OHLCV source must have (the ``backtesting`` package's spelling).
OHLCV_COLUMNS = ("Open", "High", "Low", "Close", "Volume")

#: Per-bar features, in column order of the feature arrays.
FEATURE_NAMES = ("log_return", "range", "body", "log_volume_change")

#: Column names tried, in order, as the timestamp when a file has no datetime index.
_DATE_COLUMNS = ("date", "datetime", "timestamp", "time")

#: A feature whose training standard deviation is below this is left unscaled (constant input).
_MIN_STD = 1e-12


def load_ohlcv(dataset: str) -> pd.DataFrame:
    """Load OHLCV bars by bundled sample name or from a CSV/Parquet file.

    Args:
        dataset: ``GOOG``, ``EURUSD`` or ``BTCUSD`` (samples of the ``backtesting`` package), or a
            path to a ``.csv``/``.parquet``/``.pq`` file with Open, High, Low, Close, Volume columns
            and a datetime index or a date/datetime/timestamp/time column.

    Returns:
        The cleaned bars (see :func:`clean_ohlcv`), one row per bar, oldest first.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: unsupported extension, missing columns, no timestamps, non-finite values
            or bad prices.
    """
    if dataset.upper() in BUNDLED_DATASETS:
        from backtesting import test as samples

        frame: pd.DataFrame = getattr(samples, dataset.upper()).copy()
        return clean_ohlcv(frame)
    path = Path(dataset).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"OHLCV file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(path)
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(path)
    else:
        raise ValueError(f"unsupported OHLCV file type {suffix!r} (use .csv or .parquet): {path}")
    return clean_ohlcv(_with_datetime_index(frame, path))


def _with_datetime_index(frame: pd.DataFrame, source: Path) -> pd.DataFrame:
    if isinstance(frame.index, pd.DatetimeIndex):
        return frame
    lower = {str(c).lower(): c for c in frame.columns}
    # A CSV written from a datetime-indexed frame has its index as the first, often unnamed, column.
    candidates = [lower[n] for n in _DATE_COLUMNS if n in lower]
    first = frame.columns[0] if len(frame.columns) else None
    if first is not None and (str(first).startswith("Unnamed") or str(first) == ""):
        candidates.append(first)
    for column in candidates:
        stamps = pd.to_datetime(frame[column], errors="coerce")
        if stamps.notna().all():
            return frame.drop(columns=[column]).set_index(pd.DatetimeIndex(stamps))
    raise ValueError(
        f"{source}: no timestamps; need a datetime index or one of the columns "
        f"{', '.join(_DATE_COLUMNS)}"
    )


def clean_ohlcv(frame: pd.DataFrame) -> pd.DataFrame:
    """Validate and tidy raw bars: OHLCV columns as floats, NaN rows dropped, sorted by time.

    A bar with a missing value (NaN, or text that is not a number) is dropped; a bar with an
    infinite value is refused, since one such bar would turn every loss into NaN.

    Args:
        frame: bars with a ``DatetimeIndex`` and at least the :data:`OHLCV_COLUMNS`
            (extra columns are dropped).

    Returns:
        A new frame with exactly the OHLCV columns, float64, unique timestamps in ascending order.

    Raises:
        ValueError: columns missing, index not datetime, an infinite value (the message names
            the column and the first such bar's timestamp), fewer than 2 bars, or a price <= 0.
    """
    missing = [c for c in OHLCV_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"OHLCV data is missing columns: {', '.join(missing)}")
    if not isinstance(frame.index, pd.DatetimeIndex):
        # ValueError like every other "these bars are unusable" case, so callers catch one type.
        raise ValueError("OHLCV data needs a DatetimeIndex (one timestamp per bar)")  # noqa: TRY004
    bars = frame.loc[:, list(OHLCV_COLUMNS)].apply(pd.to_numeric, errors="coerce").astype(float)
    bars = bars.dropna().sort_index()
    bars = bars[~bars.index.duplicated(keep="last")]
    _check_finite(bars)
    if len(bars) < 2:
        raise ValueError(f"OHLCV data has {len(bars)} complete bars; need at least 2")
    prices = bars.loc[:, ["Open", "High", "Low", "Close"]].to_numpy()
    if (prices <= 0).any():
        raise ValueError("OHLCV data has prices <= 0; log returns need positive prices")
    return bars


def _check_finite(bars: pd.DataFrame) -> None:
    """Raise ValueError naming the first bar (in time) with an infinite value, and its columns."""
    bad = ~np.isfinite(bars.to_numpy())
    rows = np.flatnonzero(bad.any(axis=1))
    if len(rows) == 0:
        return
    first = rows[0]
    columns = [c for c, flag in zip(bars.columns, bad[first], strict=True) if flag]
    values = ", ".join(f"{c}={bars.iloc[first][c]}" for c in columns)
    later = len(rows) - 1
    more = f" (and {later} later bar{'s' if later > 1 else ''})" if later else ""
    raise ValueError(
        f"OHLCV data has a non-finite {'/'.join(columns)} at {bars.index[first]} "
        f"({values}){more}; prices and volume must be finite numbers"
    )


def bar_features(bars: pd.DataFrame) -> FloatArray:
    """Per-bar features of bars 1..n-1, each from that bar and the one before only.

    Features (:data:`FEATURE_NAMES`): log return ``ln(C_t / C_{t-1})``; high-low range
    ``(H_t - L_t) / C_t``; candle body ``ln(C_t / O_t)``; log volume change
    ``ln(1 + V_t) - ln(1 + V_{t-1})``.

    Args:
        bars: cleaned bars (:func:`clean_ohlcv`), n rows.

    Returns:
        Array of shape (n - 1, 4), float32; row ``i`` describes bar ``i + 1``.
    """
    close = bars["Close"].to_numpy()
    volume = np.log1p(np.clip(bars["Volume"].to_numpy(), 0.0, None))
    high, low, open_ = (bars[c].to_numpy() for c in ("High", "Low", "Open"))
    columns = (
        np.diff(np.log(close)),
        ((high - low) / close)[1:],
        np.log(close / open_)[1:],
        np.diff(volume),
    )
    return np.stack(columns, axis=1).astype(np.float32)


@dataclass(frozen=True)
class FeatureSet:
    """Windows of per-bar features and next-bar direction targets, one sample per end bar.

    Attributes:
        features: shape (n_samples, window, n_features), float32; the last row of sample ``j``
            describes its end bar ``t``, earlier rows the ``window - 1`` bars before it.
        targets: shape (n_samples,), float32; 1.0 if ``Close[t + 1] > Close[t]`` else 0.0.
        end_times: the timestamp of each sample's end bar ``t``, ascending, length n_samples.
    """

    features: FloatArray
    targets: FloatArray
    end_times: pd.DatetimeIndex


def build_features(bars: pd.DataFrame, window: int) -> FeatureSet:
    """Turn n bars into samples ending at bars ``window .. n - 2`` (each needs a next bar).

    Args:
        bars: cleaned bars (:func:`clean_ohlcv`).
        window: bars of history per sample (>= 1).

    Returns:
        A :class:`FeatureSet` with ``n - 1 - window`` samples.

    Raises:
        ValueError: fewer than ``window + 2`` bars (no sample would have a target).
    """
    n_samples = len(bars) - 1 - window
    if n_samples < 1:
        raise ValueError(f"{len(bars)} bars are too few for a {window}-bar window plus a target")
    per_bar = bar_features(bars)
    # sliding_window_view gives (n - window, n_features, window); window k ends at bar k + window.
    windows = np.lib.stride_tricks.sliding_window_view(per_bar, window, axis=0)
    features = np.ascontiguousarray(windows[:n_samples].transpose(0, 2, 1))
    close = bars["Close"].to_numpy()
    end = np.arange(window, window + n_samples)
    targets = (close[end + 1] > close[end]).astype(np.float32)
    return FeatureSet(features, targets, pd.DatetimeIndex(bars.index[end]))


@dataclass(frozen=True)
class Standardiser:
    """Per-feature z-scoring with statistics fitted on training samples only.

    Attributes:
        mean: shape (n_features,), float32.
        std: shape (n_features,), float32; constant features get 1.0 so they pass unscaled.
    """

    mean: FloatArray
    std: FloatArray

    @classmethod
    def fit(cls, features: FloatArray) -> Standardiser:
        """Fit on training windows of shape (n_samples, window, n_features)."""
        flat = features.reshape(-1, features.shape[-1]).astype(np.float64)
        std = flat.std(axis=0)
        std[std < _MIN_STD] = 1.0
        return cls(flat.mean(axis=0).astype(np.float32), std.astype(np.float32))

    def apply(self, features: FloatArray) -> FloatArray:
        """Standardise windows of shape (..., n_features); returns the same shape, float32."""
        return ((features - self.mean) / self.std).astype(np.float32)


@dataclass(frozen=True)
class SplitData:
    """Chronological train/validation split, standardised with the training statistics.

    Attributes:
        x_train: shape (n_train, window, n_features), float32.
        y_train: shape (n_train,), float32 (0.0/1.0).
        x_val: shape (n_val, window, n_features), float32; all after the training samples.
        y_val: shape (n_val,), float32.
        standardiser: the statistics fitted on ``x_train`` before scaling.
    """

    x_train: FloatArray
    y_train: FloatArray
    x_val: FloatArray
    y_val: FloatArray
    standardiser: Standardiser

    @property
    def n_features(self) -> int:
        """Features per bar."""
        return int(self.x_train.shape[-1])


def split_chronological(feature_set: FeatureSet, validation_fraction: float) -> SplitData:
    """Split samples by time: the last ``validation_fraction`` of them validate, the rest train.

    Args:
        feature_set: samples in time order.
        validation_fraction: share of samples (0-1) held out at the end.

    Returns:
        The split, standardised with statistics of the training samples only.

    Raises:
        ValueError: either part would be empty.
    """
    n = len(feature_set.targets)
    n_val = round(n * validation_fraction)
    n_train = n - n_val
    if n_val < 1 or n_train < 1:
        raise ValueError(f"{n} samples cannot be split {validation_fraction:.0%} for validation")
    raw_train, raw_val = feature_set.features[:n_train], feature_set.features[n_train:]
    standardiser = Standardiser.fit(raw_train)
    return SplitData(
        x_train=standardiser.apply(raw_train),
        y_train=feature_set.targets[:n_train],
        x_val=standardiser.apply(raw_val),
        y_val=feature_set.targets[n_train:],
        standardiser=standardiser,
    )
