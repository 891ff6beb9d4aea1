"""Gradio demo of vision-language models run natively in PyTorch: `python app.py`.

Settings come from environment variables (see vlm/ui/settings.py); without hub access or local
weights every family is served from a built-in tiny random checkpoint, with a banner saying so.
"""

import logging

from vlm.ui import Settings, build, launch

settings = Settings.from_env()
demo = build(settings)

if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("vlm").setLevel(logging.INFO)  # refused requests (one line each) and failures
    launch(demo, settings)
