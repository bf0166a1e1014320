"""Hugging Face conversion: adapters per target class (`hybrid/convert/targets/`), export
(`to-hf`), import (`from-hf`) and logits-parity verification. Only this package imports
`transformers`, lazily (`_hf.require_transformers`)."""

from hybrid.convert.base import TARGETS, all_targets
from hybrid.convert.export import ExportOptions, ExportResult, choose_target, export_to_hf
from hybrid.convert.importer import ImportResult, import_from_hf
from hybrid.convert.verify import TOLERANCE, VerifyReport, verify_export

__all__ = [
    "TARGETS",
    "TOLERANCE",
    "ExportOptions",
    "ExportResult",
    "ImportResult",
    "VerifyReport",
    "all_targets",
    "choose_target",
    "export_to_hf",
    "import_from_hf",
    "verify_export",
]
