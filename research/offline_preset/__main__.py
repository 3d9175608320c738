"""``python -m research.offline_preset STAGE [options]`` (run from the checkout's root): see cli.py."""
from .cli import main

main()
