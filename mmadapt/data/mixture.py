"""Several datasets as one: samples of different modalities side by side, for one graph with a bridge per modality."""
from __future__ import annotations

import bisect
import dataclasses
from typing import Any

from torch.utils.data import Dataset

from mmadapt.data.modalities import modality_fields
from mmadapt.errors import DataError
from mmadapt.core.semantics import Finding, section_fields, section_findings



class MixtureDataset(Dataset):
    """The parts' samples end to end. Each sample says which modality fields it lacks, so those encoders skip it."""

    section_lists = ("parts",)  # arguments holding further data sections: `validate` checks each as one

    @classmethod
    def fields_for(cls, params: dict[str, Any]) -> frozenset[str] | None:
        """The union of the parts' fields: an encoder skips the rows of parts without its field, so it needs one part
        that has it. None when a part does not say (a plugin dataset)."""
        parts = params.get("parts")
        found = [section_fields(part) for part in parts] if isinstance(parts, list) and parts else [None]
        return None if any(f is None for f in found) else frozenset().union(*found)

    @classmethod
    def param_problems(cls, params: dict[str, Any]) -> list[Finding]:
        """Each part's own checks, located by its index."""
        parts = params.get("parts")
        return [dataclasses.replace(found, field=f"parts[{index}].{found.field}")
                for index, part in enumerate(parts if isinstance(parts, list) else []) for found in section_findings(part)]

    def __init__(
        self,
        parts: list[dict[str, Any]],  # data sections, e.g. [{type: digits_captions, ...}, {type: fsdd_captions, ...}]
    ) -> None:
        from mmadapt.data.collate import build_dataset

        if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
            raise DataError("mixture: parts must be a non-empty list of data sections, each with a type")
        self.sections = parts
        self.parts = []
        for index, section in enumerate(parts):
            try:
                self.parts.append(build_dataset(section))
            except DataError as exc:
                raise DataError(f"mixture.parts[{index}] ({section.get('type')}): {exc}") from None
        self.starts = [0]
        for part in self.parts[:-1]:
            self.starts.append(self.starts[-1] + len(part))
        self.fields = [self._fields_of(part, index) for index, part in enumerate(self.parts)]
        self.all_fields = sorted(set().union(*self.fields))

    def _fields_of(self, part: Dataset, index: int) -> set[str]:
        if len(part) == 0:
            raise DataError(f"mixture.parts[{index}] ({self.sections[index].get('type')}): no samples")
        return {field for field in modality_fields() if field in part[0]}

    def __len__(self) -> int:
        return self.starts[-1] + len(self.parts[-1])

    def locate(self, position: int) -> tuple[int, int]:
        """(part index, position within the part)."""
        part = bisect.bisect_right(self.starts, position) - 1
        return part, position - self.starts[part]

    def part_range(self, part: int) -> range:
        return range(self.starts[part], self.starts[part] + len(self.parts[part]))

    def __getitem__(self, position: int) -> dict[str, Any]:
        part, inner = self.locate(position)
        sample = dict(self.parts[part][inner])
        sample["id"] = position  # ids key the collator's rows: unique across parts
        sample["part"] = part
        sample["fields_absent"] = [f for f in self.all_fields if f not in self.fields[part]]
        return sample
