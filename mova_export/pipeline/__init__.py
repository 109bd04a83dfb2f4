"""The build: checkpoint + recipe -> bundle, stage by stage, each unit resumable in the work folder.

build.py    build() / export_bundle() / attach_llm(): the stages in order and the bundle's assembly
stages.py   the features, export, quantize and gguf units (one per component and key)
work.py     the work folder: units under their cache keys, atomic, resumable; clean()
memory.py   the memory planner: will MoVA fit on the target, and if not, what would
report.py   report.json / report.md
"""
from .build import BuildResult, attach_llm, build, check_components, export_bundle
from .work import WorkFolder, clean, default_work_dir

__all__ = ["BuildResult", "WorkFolder", "attach_llm", "build", "check_components", "clean", "default_work_dir",
           "export_bundle"]
