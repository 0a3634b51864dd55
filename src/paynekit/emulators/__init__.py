"""Emulators: models that map stellar labels to normalised spectra, all under one contract."""

from .base import Emulator
from .cannon import CannonModel  # also registers the "cannon" file kind
from .formats import load_emulator, save_emulator
from .payne import PayneMLP, PaynePerPixel

__all__ = ["CannonModel", "Emulator", "PayneMLP", "PaynePerPixel", "load_emulator", "save_emulator"]
