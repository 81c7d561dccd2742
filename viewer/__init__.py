"""napari plugin (npe2): reader for wsiflow results and slides."""

from ._reader import napari_get_reader, is_result_folder

__all__ = ['napari_get_reader', 'is_result_folder']
