"""Thin shim so `python cli.py ...` works from a checkout; the real CLI lives in mova_export.cli."""
from mova_export.cli import main

if __name__ == "__main__":
    main()
