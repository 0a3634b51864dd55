"""Emulators: models that map stellar labels to normalised spectra, all under one contract."""

from .base import Emulator
from .formats import load_emulator, save_emulator
from .payne import PayneMLP, PaynePerPixel

__all__ = ["Emulator", "PayneMLP", "PaynePerPixel", "load_emulator", "save_emulator"]
