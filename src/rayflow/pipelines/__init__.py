"""Bridges between rayflow students and diffusers pipelines (above methods, below the command line)."""

from rayflow.pipelines.export import ExportResult, export_pipeline

__all__ = ["ExportResult", "export_pipeline"]
