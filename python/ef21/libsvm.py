"""Binary classification data in the LibSVM/svmlight text format, as used by the EF21 paper.

A file holds one sample per line, ``label index:value index:value ...`` with 1-based feature
indices; absent features are zero. :func:`load` returns the samples densely as ``float64`` (the
paper's data sets are small: at most 49,749 x 300), with the two labels mapped to ``-1`` (the
smaller) and ``+1`` (the larger), as the paper's code does.

Where the files come from (first match wins): ``data_dir`` if given, else ``$EF21_DATA_DIR``, else
``../shared/data`` next to the repository when present; then the download cache ``~/.cache/ef21``
(``$EF21_CACHE_DIR``). A named data set found nowhere is downloaded from the LibSVM site into the
cache when the network allows.

Example::
    >>> from ef21.libsvm import load
    >>> X, y = load("phishing")
    >>> X.shape, y.unique()
    (torch.Size([11055, 68]), tensor([-1.,  1.], dtype=torch.float64))
"""

from __future__ import annotations

import os
import tempfile
import urllib.request
from pathlib import Path

import torch

DATASETS = ("a9a", "mushrooms", "phishing", "w8a")
URL = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/binary/"


def default_data_dir() -> Path | None:
    """``$EF21_DATA_DIR``, else ``../shared/data`` next to the repository if it exists, else None."""
    env = os.environ.get("EF21_DATA_DIR")
    if env:
        return Path(env).expanduser()
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"  # python/ef21/ -> repo -> ..
    return shared if shared.is_dir() else None


def cache_dir() -> Path:
    return Path(os.environ.get("EF21_CACHE_DIR", "~/.cache/ef21")).expanduser()


def candidates(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The paths :func:`find` tries for data set ``name``, in order."""
    dirs = [Path(data_dir).expanduser()] if data_dir is not None else []
    if not dirs and default_data_dir() is not None:
        dirs.append(default_data_dir())
    dirs.append(cache_dir())
    # The paper's repository names the files <name>.txt; the LibSVM site serves them as <name>.
    return [d / f for d in dirs for f in (f"{name}.txt", name)]


def find(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The local file of data set ``name`` (or ``name`` itself when it is a path to a file).

    A known data set (:data:`DATASETS`) found nowhere is downloaded into :func:`cache_dir` when
    ``download`` is true and the network allows. Raises ``FileNotFoundError`` naming every path
    tried and how to provide the file.
    """
    if os.sep in str(name) or Path(name).is_file():
        if Path(name).is_file():
            return Path(name)
        raise FileNotFoundError(f"ef21.libsvm: no file {name}")
    tried = candidates(name, data_dir)
    for path in tried:
        if path.is_file():
            return path
    why = "downloads disabled"
    if name in DATASETS and download:
        try:
            return _download(name)
        except OSError as err:  # URLError and timeouts are OSErrors: offline, blocked or moved
            why = f"download from {URL}{name} failed: {err}"
    elif name not in DATASETS:
        why = f"not one of the known data sets {', '.join(DATASETS)}, so not downloaded"
    raise FileNotFoundError(
        f"ef21.libsvm: data set {name!r} not found; tried {', '.join(str(p) for p in tried)} ({why}). "
        f"Put {name}.txt (LibSVM format) in one of those folders, point $EF21_DATA_DIR or data_dir= at "
        f"the folder holding it, or download {URL}{name} to {cache_dir() / name}.")


def _download(name: str) -> Path:
    target = cache_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(URL + name, timeout=30) as response:
        data = response.read()
    # Written under a temporary name and renamed, so an interrupted download leaves no half file.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    return target


def parse(path: str | os.PathLike, d: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads a LibSVM file: ``(X, labels)``, X dense ``float64 [N, d]`` and the labels as written.

    ``d`` defaults to the largest feature index in the file; a given ``d`` smaller than that is
    refused. Indices are 1-based (column ``j - 1`` of X holds feature ``j``); ``qid:`` fields and
    ``#`` comments are ignored.
    """
    rows, cols, vals, labels = [], [], [], []
    with open(path, encoding="ascii") as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].split()
            if not line:
                continue
            r = len(labels)
            try:
                labels.append(float(line[0]))
                for field in line[1:]:
                    key, value = field.split(":")
                    if key == "qid":
                        continue
                    j = int(key)
                    if j < 1:
                        raise ValueError(f"feature index {j} (indices are 1-based)")
                    rows.append(r)
                    cols.append(j - 1)
                    vals.append(float(value))
            except ValueError as err:
                raise ValueError(f"{path}:{lineno}: not LibSVM format: {err}") from None
    if not labels:
        raise ValueError(f"{path}: no samples")
    cols_t = torch.tensor(cols, dtype=torch.int64)
    width = int(cols_t.max()) + 1 if cols else 0
    if d is None:
        d = width
    elif d < width:
        raise ValueError(f"d={d} is smaller than the largest feature index {width} in {path}")
    X = torch.zeros(len(labels), d, dtype=torch.float64)
    X.index_put_((torch.tensor(rows, dtype=torch.int64), cols_t), torch.tensor(vals, dtype=torch.float64))
    return X, torch.tensor(labels, dtype=torch.float64)


def binary_labels(labels: torch.Tensor) -> torch.Tensor:
    """Two distinct labels mapped to -1 (the smaller) and +1 (the larger), as the paper's code does."""
    values = labels.unique()
    if values.numel() != 2:
        raise ValueError(f"expected two distinct labels, got {values.numel()}: {values[:10].tolist()}")
    return torch.where(labels == values[0], -1.0, 1.0).to(torch.float64)


def load(name: str, data_dir: str | os.PathLike | None = None, d: int | None = None,
         download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Data set ``name`` (a9a, mushrooms, phishing, w8a, another file name in the data folder, or a
    path): ``X`` dense ``float64 [N, d]`` in file order and ``y`` ``float64 [N]`` in {-1, +1}."""
    X, labels = parse(find(name, data_dir, download), d)
    return X, binary_labels(labels)
