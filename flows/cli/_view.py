"""``wsiflow view``: open a result folder (or a slide) in napari with the wsiflow plugin."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline import ResultFolder

from .._config import WsiflowConfig
from ._common import EXIT_FAILED, EXIT_OK

__all__ = ["add_view_parser", "run_view"]


def add_view_parser(commands: argparse._SubParsersAction) -> None:
    view = commands.add_parser(
        "view",
        help="open a result folder or a slide in napari",
        description=(
            "Open a wsiflow result folder (OUT/<slide id>/<model>/: its latest result, or one result folder) "
            "or a slide in napari: the slide as a "
            "lazy multiscale image, one heatmap per class and the tissue mask, all in µm. A result's "
            "slide is found through this site's private slide index."
        ),
    )
    view.add_argument("path", type=Path, metavar="RESULT_OR_SLIDE")


def run_view(args: argparse.Namespace, config: WsiflowConfig) -> int:
    from viewer import napari_get_reader

    if napari_get_reader(str(args.path)) is None:
        print("wsiflow: error unsupported: not a wsiflow result folder or a readable slide with a known µm/px",
              file=sys.stderr)
        return EXIT_FAILED
    # Qt6: a venv that still holds PyQt5 would otherwise pick it (deprecated in napari 0.9).
    os.environ.setdefault("QT_API", "pyqt6")
    import napari
    from napari.settings import get_settings

    # Slice (read slide tiles) off the GUI thread so panning a gigapixel slide stays fluid.
    get_settings().experimental.async_ = True
    viewer = napari.Viewer(title="wsiflow")
    viewer.open(str(args.path), plugin="wsiflow")
    if ResultFolder.find(args.path) is not None:
        viewer.window.add_plugin_dock_widget("wsiflow", "wsiflow review")
    viewer.canvas.overlays.scale_bar.visible = True  # in µm: every wsiflow layer carries units
    napari.run()
    return EXIT_OK
