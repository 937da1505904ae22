"""Serving: load an export folder (`load_export`), answer requests (`serve.engine`), over HTTP (`serve.app`).
Never imports train/ or DeepSpeed: an export folder is all it reads."""
from serve.load import Export, ExportLoadError, load_export

__all__ = ["Export", "ExportLoadError", "load_export"]
