"""GLIP Explorer's Gradio app (UI only: layout, callbacks, rendering). Entry point: `python app.py`."""
from .models import ModelManager
from .ui import build_demo, launch_kwargs, queue

__all__ = ["ModelManager", "build_demo", "launch_kwargs", "queue"]
