"""napari plugin (npe2): reader for wsiflow results and slides."""

from ._reader import is_result_folder, napari_get_reader

__all__ = ['napari_get_reader', 'is_result_folder']
