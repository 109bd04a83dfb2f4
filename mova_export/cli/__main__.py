"""`python -m mova_export.cli ...`, the same as the `mova-export` console script."""
from . import main

main()
