"""Per-layer spectra for people: a table of the ranks each rule would pick, and a plot of spectra and energy."""

from __future__ import annotations

from pathlib import Path

from rankcut.inventory import Candidate
from rankcut.linalg import evbmf
from rankcut.plan import format_table
from rankcut.selectors import energy_rank

ENERGY_LEVELS = (0.9, 0.95, 0.99)


def _largest_paying_rank(candidate: Candidate) -> str:
    decomposition, info = candidate.decomposition, candidate.info
    paying = [r for r in decomposition.ranks_by_size(info) if decomposition.pays_off(info, r)]
    return str(paying[-1]) if paying else "none"


def _evbmf_ranks(candidate: Candidate) -> list[tuple[int, float, float]]:
    """Per spectrum of the layer: the EVBMF rank, σ² and threshold of the group with the highest rank."""
    out = []
    for spectrum in candidate.decomposition.spectra(candidate.basis()):
        worst = max((evbmf(values, spectrum.matrix_shape) for values in spectrum.S), key=lambda r: r.rank)
        out.append((worst.rank, worst.sigma2, worst.threshold))
    return out


def spectrum_report(candidates: list[Candidate], plot_path: str | Path | None = None) -> str:
    """A table with one row per spectrum of each layer (full rank, EVBMF rank and σ², energy ranks, largest
    paying rank); with ``plot_path``, also a PNG of the spectra and energy curves."""
    rows = [("layer", "spectrum", "full rank", "evbmf rank", "evbmf σ²", *(f"energy {e:g}" for e in ENERGY_LEVELS),
             "largest paying rank")]
    evbmf_by_layer = {}
    for candidate in candidates:
        spectra = candidate.decomposition.spectra(candidate.basis())
        evbmf_by_layer[candidate.name] = _evbmf_ranks(candidate)
        labels = ("out", "in") if len(spectra) == 2 else ("matrix",)
        for label, spectrum, (rank, sigma2, _) in zip(labels, spectra, evbmf_by_layer[candidate.name], strict=True):
            rows.append((candidate.name, label, str(spectrum.max_rank), str(rank), f"{sigma2:.3g}",
                         *(str(energy_rank(spectrum, e)) for e in ENERGY_LEVELS), _largest_paying_rank(candidate)))
    if plot_path is not None:
        _plot(candidates, evbmf_by_layer, plot_path)
    return format_table(rows)


def check_plot_path(path: str | Path) -> None:
    """Refuse a plot file name whose ending is not an image format matplotlib writes (before any work)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install 'rankcut[plot]'") from error
    formats = Figure().canvas.get_supported_filetypes()
    if Path(path).suffix.lstrip(".").lower() not in formats:
        raise RuntimeError(f"--plot {path}: the plot is an image; give a file ending in one of "
                           f"{', '.join('.' + name for name in sorted(formats))} (e.g. spectrum.png)")


def _plot(candidates: list[Candidate], evbmf_by_layer: dict, path: str | Path) -> Path:
    """Save a PNG: normalized singular values with each layer's EVBMF rank marked (left), energy (right)."""
    check_plot_path(path)  # also says when matplotlib is missing
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    colormap = plt.cm.viridis
    for index, candidate in enumerate(candidates):
        color = colormap(index / max(len(candidates) - 1, 1))
        spectrum = candidate.decomposition.spectra(candidate.basis())[0]
        values = spectrum.S.pow(2).sum(0).sqrt()
        normalized = (values / values[0]).tolist()
        position = [(i + 1) / spectrum.max_rank for i in range(spectrum.max_rank)]
        left.semilogy(position, normalized, color=color, linewidth=0.8)
        rank = evbmf_by_layer[candidate.name][0][0]
        if rank:
            left.scatter([position[rank - 1]], [normalized[rank - 1]], color=color, marker="o", s=14, zorder=3)
        right.plot(position, spectrum.energy().tolist(), color=color, linewidth=0.8)
    left.set(xlabel="rank / full rank", ylabel="σ / σ₁ (log)", title="spectra (● EVBMF rank)")
    right.set(xlabel="rank / full rank", ylabel="cumulative energy Σσ²", title="energy kept by rank")
    for level in ENERGY_LEVELS:
        right.axhline(level, color="grey", linestyle=":", linewidth=0.6)
    scale = plt.cm.ScalarMappable(cmap=colormap, norm=plt.Normalize(0, max(len(candidates) - 1, 1)))
    figure.colorbar(scale, ax=right, label="layer index (model order)")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
