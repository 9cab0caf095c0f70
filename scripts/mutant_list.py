"""The planted bugs of scripts/mutants.py: one module per area, each a list MUTANTS of
(name, file, exact piece of the file, the wrong piece, pytest selection, what it breaks)."""
import importlib
from pathlib import Path

AREAS = sorted(p.stem for p in Path(__file__).parent.glob("mutants_*.py"))
MUTANTS = [m for area in AREAS for m in importlib.import_module(area).MUTANTS]
