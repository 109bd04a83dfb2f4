"""Bundles: the typed manifest, loading with sha256 verification, atomic staging, hashes and fingerprints.

Pure Python: the device runtime loads bundles through this package.
"""
from .files import FileTable, checkpoint_fingerprint, file_table, link_or_copy, sha256_file, tool_versions
from .manifest import (
                       ARTIFACT_DIRS,
                       FORMAT,
                       FORMAT_VERSION,
                       MANIFEST,
                       PRECISIONS,
                       Bundle,
                       GraphEntry,
                       LLMEntry,
                       LLMSettings,
                       Manifest,
                       RuntimeDefaults,
                       Variant,
                       load_bundle,
                       verify_files,
)
from .staging import Terminated, make_temp_dir, staged_dir, terminate_as_interrupt

__all__ = ["ARTIFACT_DIRS", "FORMAT", "FORMAT_VERSION", "MANIFEST", "PRECISIONS", "Bundle", "FileTable", "GraphEntry",
           "LLMEntry",
           "LLMSettings", "Manifest", "RuntimeDefaults", "Terminated", "Variant", "checkpoint_fingerprint",
           "file_table", "link_or_copy", "load_bundle", "make_temp_dir", "sha256_file", "staged_dir",
           "terminate_as_interrupt", "tool_versions", "verify_files"]
