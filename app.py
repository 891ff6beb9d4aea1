"""Gradio demo of vision-language models run natively in PyTorch: `python app.py`.

Settings come from environment variables (see vlm/ui/settings.py); without hub access or local
weights every family is served from a built-in tiny random checkpoint, with a banner saying so.
"""

import logging

from vlm.ui import Settings, build, launch

logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("vlm").setLevel(logging.INFO)  # tiny checkpoints served, refused requests, failures
settings = Settings.from_env()
demo = build(settings)

if __name__ == "__main__":
    launch(demo, settings)
