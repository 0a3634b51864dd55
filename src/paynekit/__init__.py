"""paynekit: stellar labels from spectra with The Payne and The Cannon, at survey scale."""

from .emulators import CannonModel, Emulator, PayneMLP, PaynePerPixel, load_emulator, save_emulator
from .errors import FileFormatError, InputError, NotFittedError, PaynekitError
from .fitting import FitConfig, FitResult, fit
from .io import read_spectra
from .labels import LabelSpace, apogee_label_space

__version__ = "0.1.0"

__all__ = [
    "CannonModel", "Emulator", "PayneMLP", "PaynePerPixel", "load_emulator", "save_emulator",
    "LabelSpace", "apogee_label_space", "read_spectra", "fit", "FitConfig", "FitResult",
    "PaynekitError", "InputError", "FileFormatError", "NotFittedError",
]  # fmt: skip
