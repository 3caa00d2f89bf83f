"""Names, SNOMED CT codes and display colours of the classes this project segments.

One table serves the DICOM SEG writer of the Deploy app and the MONAI Label app: a class name of a
bundle (``class_names``/``channel_def``, e.g. ``right_ventricle``) maps to a :class:`SegmentTerm`.
Display names are the anatomical names of 3D Slicer's generic anatomy colour table where it has the
structure (``Right ventricle of heart``), so Slicer's MONAI Label module, which colours segments by
their name, finds them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SegmentTerm", "ANATOMICAL_STRUCTURE", "term_for"]

#: Segmented property category of every class here: SNOMED CT "Anatomical Structure".
ANATOMICAL_STRUCTURE = ("123037004", "SCT", "Anatomical Structure")


@dataclass(frozen=True)
class SegmentTerm:
    """How one class is named, coded and coloured.

    Attributes:
        name: the bundle's class name.
        display: human-readable name (also the segment name shown in 3D Slicer).
        code: segmented property type as (code value, coding scheme designator, code meaning).
        rgb: display colour, 0..255 per channel.
    """

    name: str
    display: str
    code: tuple[str, str, str]
    rgb: tuple[int, int, int]


_TERMS = {
    t.name: t
    for t in (
        SegmentTerm("aorta", "Aorta", ("15825003", "SCT", "Aorta"), (224, 97, 76)),
        SegmentTerm("gallbladder", "Gallbladder", ("28231008", "SCT", "Gallbladder"), (139, 150, 98)),
        SegmentTerm("left_kidney", "Left kidney", ("18639004", "SCT", "Left kidney"), (185, 102, 83)),
        SegmentTerm("right_kidney", "Right kidney", ("9846003", "SCT", "Right kidney"), (214, 150, 120)),
        SegmentTerm("kidney", "Kidney", ("64033007", "SCT", "Kidney"), (185, 102, 83)),
        SegmentTerm("liver", "Liver", ("10200004", "SCT", "Liver"), (221, 130, 101)),
        SegmentTerm("pancreas", "Pancreas", ("15776009", "SCT", "Pancreas"), (249, 180, 111)),
        SegmentTerm("spleen", "Spleen", ("78961009", "SCT", "Spleen"), (157, 108, 162)),
        SegmentTerm("stomach", "Stomach", ("69695003", "SCT", "Stomach"), (216, 132, 105)),
        SegmentTerm(
            "right_ventricle", "Right ventricle of heart", ("53085002", "SCT", "Right ventricle"), (51, 102, 204)
        ),
        SegmentTerm(
            "myocardium", "Left ventricle myocardium", ("49848007", "SCT", "Left Ventricle Myocardium"), (230, 170, 50)
        ),
        SegmentTerm(
            "left_ventricle", "Left ventricle of heart", ("87878005", "SCT", "Left Ventricle"), (204, 51, 51)
        ),
    )
}
#: Colours of classes the table does not know, by label value.
_PALETTE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
_GENERIC = ("91723000", "SCT", "Anatomical Structure")


def term_for(class_name: str, index: int) -> SegmentTerm:
    """The term of a class; unknown names get the generic anatomical-structure code and a palette colour.

    Args:
        class_name: the bundle's class name (case and spaces do not matter: ``Left Ventricle`` works).
        index: the class's label value (1 for the first foreground class), which picks the palette colour.
    """
    key = class_name.strip().lower().replace(" ", "_").replace("-", "_")
    known = _TERMS.get(key)
    if known is not None:
        return known
    display = class_name.replace("_", " ").strip()
    return SegmentTerm(class_name, display[:1].upper() + display[1:], _GENERIC, _PALETTE[(index - 1) % len(_PALETTE)])
