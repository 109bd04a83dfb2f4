"""The build: checkpoint + recipe -> bundle, stage by stage, each unit resumable in the work folder.

request.py   BuildRequest: what a build is asked to do (the CLI fills one)
unit.py      the Stage protocol and run_unit (find, check disk, produce, record), BuildContext
stages/      features, export, quantize, gguf, compile: one Stage each
assemble.py  the bundle's files and manifest
plan.py      the memory planner: will MoVA fit on the target, and if not, what would
llm_shape.py the LLM's KV cache and compute buffer per context, for the planner
report.py    report.json / report.md
work.py      the work folder: units under their keys, atomic, resumable; clean()
build.py     build() / export_bundle() / attach_llm(): the stages in order
"""
from .build import BuildResult, attach_llm, build, check_components, export_bundle
from .request import BuildRequest
from .work import WorkFolder, clean, default_work_dir

__all__ = ["BuildRequest", "BuildResult", "WorkFolder", "attach_llm", "build", "check_components", "clean",
           "default_work_dir", "export_bundle"]
