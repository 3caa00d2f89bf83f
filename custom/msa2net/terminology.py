"""Coded terms and display colours of the segment classes, shared by the MONAI Deploy and MONAI Label apps.

A DICOM SEG names each segment with a coded "segmented property type" (SNOMED CT here) and may
recommend a display colour. The class names are this project's (the ``class_names`` of the dataset
profiles); names without a known code get SNOMED CT "Anatomical Structure" and a palette colour
chosen by their label index, so a model trained on other classes still gets a valid SEG.

Codes are plain ``(value, scheme, meaning)`` tuples so that this module needs neither pydicom nor
highdicom (``pydicom.sr.coding.Code(*term.code)`` builds the object where one is needed).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SegmentTerm", "term_for", "ANATOMY_CATEGORY", "GENERIC_CODE", "PALETTE"]

#: SNOMED CT "Anatomical Structure" as the segmented property *category* (DICOM SEG) of every class here;
#: 3D Slicer's terminology lists file the structures below under this category.
ANATOMY_CATEGORY = ("123037004", "SCT", "Anatomical Structure")

#: SNOMED CT "Anatomical Structure": the property type of classes without a more specific code.
GENERIC_CODE = ("91723000", "SCT", "Anatomical Structure")

#: SNOMED CT codes of the class names the profiles use (values as in DICOM PS3.16 / pydicom's ``codes.SCT``).
_SCT_CODES = {
    "aorta": ("15825003", "SCT", "Aorta"),
    "gallbladder": ("28231008", "SCT", "Gallbladder"),
    "left_kidney": ("18639004", "SCT", "Left kidney"),
    "right_kidney": ("9846003", "SCT", "Right kidney"),
    "kidney": ("64033007", "SCT", "Kidney"),
    "liver": ("10200004", "SCT", "Liver"),
    "pancreas": ("15776009", "SCT", "Pancreas"),
    "spleen": ("78961009", "SCT", "Spleen"),
    "stomach": ("69695003", "SCT", "Stomach"),
    "right_ventricle": ("53085002", "SCT", "Right ventricle"),
    "left_ventricle": ("87878005", "SCT", "Left ventricle"),
    "myocardium": ("49848007", "SCT", "Left Ventricle Myocardium"),
}

#: Display colours (RGB) by class name.
_COLORS = {
    "aorta": (224, 97, 76),
    "gallbladder": (139, 150, 98),
    "left_kidney": (185, 102, 83),
    "right_kidney": (214, 150, 120),
    "liver": (221, 130, 101),
    "pancreas": (249, 180, 111),
    "spleen": (157, 108, 162),
    "stomach": (216, 132, 105),
    "right_ventricle": (51, 102, 204),
    "myocardium": (230, 170, 50),
    "left_ventricle": (204, 51, 51),
}

#: Colours of classes without one in :data:`_COLORS`, taken in turn by label index.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207),
)


@dataclass(frozen=True)
class SegmentTerm:
    """How one class is named and shown in a DICOM SEG or a viewer.

    Attributes:
        name: the class name as the bundle states it (``class_names``).
        display: a human-readable name (``"left ventricle"``).
        code: SNOMED CT segmented property type, ``(value, scheme, meaning)``.
        rgb: recommended display colour.
    """

    name: str
    display: str
    code: tuple[str, str, str]
    rgb: tuple[int, int, int]


def term_for(class_name: str, index: int) -> SegmentTerm:
    """The term of class ``class_name`` with label value ``index`` (1 for the first foreground class).

    Args:
        class_name: class name (case and spaces are ignored when looking up the code: ``"Left ventricle"``
            and ``"left_ventricle"`` are the same class).
        index: the class's label value; picks the palette colour of a name without its own colour.

    Returns:
        The known code and colour of the name, else :data:`GENERIC_CODE` and ``PALETTE[(index - 1) % len(PALETTE)]``.
    """
    key = "_".join(str(class_name).strip().lower().replace("-", " ").split())
    return SegmentTerm(
        name=str(class_name),
        display=key.replace("_", " "),
        code=_SCT_CODES.get(key, GENERIC_CODE),
        rgb=_COLORS.get(key, PALETTE[(int(index) - 1) % len(PALETTE)]),
    )
