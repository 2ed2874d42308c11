"""A classification result as a DICOM Structured Report (TID 1500, highdicom).

The DICOM node sends this report back to the PACS; any other front door may
write one too. The report is a TID 1500 Measurement Report in a new series of
the study it describes:

- observation context with a device observer (the node, model name, manufacturer
  ``SlicerMedClass``);
- an image library and source image references (the images that were classified);
- one TID 1501 group holding a Qualitative Evaluation per finding (the class's
  SNOMED CT code from the model card, a private ``99MEDCLASS`` code otherwise),
  one numeric item per class probability (UCUM unit ``{probability}``) and a
  TID 4019 algorithm identification (model name and version from the card);
- optionally (:mod:`medclass.calibration`) the operating point a triage rule used, as numeric
  items of the group: ``OPTHR<CLASS>`` "Operating point threshold for <class>" ({probability}),
  ``OPTGT<CLASS>`` "Operating point target <sensitivity|specificity> for <class>", and the
  held-out ``OPSENS<CLASS>`` / ``OPSPEC<CLASS>`` "Held-out sensitivity|specificity at threshold
  for <class>" (UCUM ``1``); and the split-conformal prediction set: a Qualitative Evaluation
  ``CONFORMAL`` "Conformal prediction result" whose value is the one class of the set, or SCT
  82334004 "Indeterminate" when the set holds more (or fewer) than one class, with
  ``CONFCOV`` "Conformal coverage" and ``CONFSIZE`` "Conformal prediction set size". These
  concept names are in the private ``99MEDCLASS`` scheme (declared in the Coding Scheme
  Identification Sequence): DICOM and SNOMED CT have no concepts for a model's operating point;
- VerificationFlag UNVERIFIED: a model's output is not a physician's report.
"""

from __future__ import annotations

import struct
import warnings
from typing import Any, Sequence

import highdicom as hd
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.sr.codedict import codes
from pydicom.tag import BaseTag
from pydicom.valuerep import AMBIGUOUS_VR, VR

from medclass import __version__

MANUFACTURER = "SlicerMedClass"
PRIVATE_SCHEME = "99MEDCLASS"
#: "Clinical finding" (SCT 404684003): the concept name of each qualitative evaluation.
#: Not DCM 121071 "Finding", which TID 1501 reserves for the group's finding type
#: (highdicom's parser skips items of that name).
FINDING = hd.sr.CodedConcept("404684003", "SCT", "Clinical finding")
#: The probability of a class, as a numeric measurement.
PROBABILITY_UNIT = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
#: Dimensionless ratios (target and held-out sensitivity / specificity, coverage, set size).
RATIO_UNIT = hd.sr.CodedConcept("1", "UCUM", "no units")
#: The value of the conformal result when the set does not single out one class.
INDETERMINATE = hd.sr.CodedConcept("82334004", "SCT", "Indeterminate")
CONFORMAL_RESULT = hd.sr.CodedConcept("CONFORMAL", PRIVATE_SCHEME, "Conformal prediction result")
CONFORMAL_COVERAGE = hd.sr.CodedConcept("CONFCOV", PRIVATE_SCHEME, "Conformal coverage")
CONFORMAL_SET_SIZE = hd.sr.CodedConcept("CONFSIZE", PRIVATE_SCHEME, "Conformal prediction set size")
#: "Imaging procedure" (SCT 363679005): the generic procedure reported.
IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


def class_code(card: dict[str, Any], name: str) -> hd.sr.CodedConcept:
    """The coded concept of a class: the card's SNOMED CT code, else a private one.

    Parameters
    ----------
    card : dict
        The model card (``card["class_codes"]`` maps a class to ``[scheme, value, meaning]``).
    name : str
        The class name.

    Returns
    -------
    highdicom.sr.CodedConcept
    """
    code = (card.get("class_codes") or {}).get(name)
    if code:
        scheme, value, meaning = code
        return hd.sr.CodedConcept(str(value), str(scheme), str(meaning))
    # Private scheme: the value must be short (SH, 16 chars) and stable per class.
    value = "".join(ch for ch in name.upper() if ch.isalnum())[:16] or "CLASS"
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, name[:64])


def probability_concept(card: dict[str, Any], name: str) -> hd.sr.CodedConcept:
    """The concept name of the numeric item holding the probability of class ``name``."""
    value = ("P" + "".join(ch for ch in name.upper() if ch.isalnum()))[:16]
    return hd.sr.CodedConcept(value, PRIVATE_SCHEME, f"Probability of {name}"[:64])


def _private(prefix: str, name: str, meaning: str) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept((prefix + "".join(ch for ch in name.upper() if ch.isalnum()))[:16], PRIVATE_SCHEME,
                              meaning[:64])


def operating_point_measurements(op: dict[str, Any], algorithm: hd.sr.AlgorithmIdentification) -> list:
    """Numeric items of one operating point (see the module docstring)."""
    c, metric = op["class"], op["metric"]
    items = [(_private("OPTHR", c, f"Operating point threshold for {c}"), op["threshold"], PROBABILITY_UNIT),
             (_private("OPTGT", c, f"Operating point target {metric} for {c}"), op["target"], RATIO_UNIT)]
    for key, word, prefix in (("test_sensitivity", "sensitivity", "OPSENS"), ("test_specificity", "specificity",
                                                                              "OPSPEC")):
        if op.get(key) is not None:
            items.append((_private(prefix, c, f"Held-out {word} at threshold for {c}"), op[key], RATIO_UNIT))
    return [hd.sr.Measurement(name=n, value=float(v), unit=u, algorithm_id=algorithm) for n, v, u in items]


#: Above this many source images the report leaves out TID 1600's per-image descriptors: for a
#: 256-slice CT they took 7 of the report's 24 s to build (and grew every later copy and write),
#: and the same images are named by the source references and the evidence sequence.
IMAGE_LIBRARY_MAX_IMAGES = 32


def device_uid(ae_title: str) -> str:
    """A UID for the device observer, stable across restarts: derived from the AE title."""
    return pydicom.uid.generate_uid(entropy_srcs=["SlicerMedClass device", ae_title.strip()])


def build_classification_sr(
    source_datasets: Sequence[pydicom.Dataset],
    card: dict[str, Any],
    probabilities: dict[str, float],
    label: str | list[str],
    *,
    series_number: int = 9901,
    instance_number: int = 1,
    device_name: str = "MEDCLASS",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_description: str | None = None,
    institution_name: str | None = None,
    predecessors: Sequence[pydicom.Dataset] | None = None,
    complete: bool = True,
    operating_points: Sequence[dict[str, Any]] | None = None,
    prediction_set: Sequence[str] | None = None,
    coverage: float | None = None,
    encode_references: bool | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build a TID 1500 report of one classification.

    Parameters
    ----------
    source_datasets : sequence of pydicom.Dataset
        The classified images of one study (headers suffice: read them with
        ``stop_before_pixels=True``). Patient and study come from them.
    card : dict
        The model card of the checkpoint that produced the result.
    probabilities : dict of str to float
        Probability per class name (study- or series-level).
    label : str or list of str
        The predicted class (a list for multi-label tasks: every positive finding).
    series_number, instance_number : int
        Of the new SR series and instance.
    device_name : str
        The observer device's name, e.g. the node's AE title.
    series_instance_uid, sop_instance_uid : str, optional
        Pass fixed UIDs to make a resend of the same result the same instance
        (the node does, so that a retried C-STORE is idempotent at the PACS).
    series_description : str, optional
        Defaults to ``"MedClass <model name>"``.
    institution_name : str, optional
    predecessors : sequence of pydicom.Dataset, optional
        Earlier reports this one supersedes (e.g. made before the study grew): they go
        into the Predecessor Documents Sequence (0040,A360). Each needs its Study,
        Series and SOP Instance UIDs and SOP Class UID; :func:`report_reference`
        makes one from those four.
    complete : bool
        CompletionFlag COMPLETE (default), or PARTIAL when the images may not be the
        whole study (e.g. it was interrupted while arriving).
    operating_points : sequence of dict, optional
        Operating points used for this result (:func:`medclass.calibration.operating_point`:
        ``class, metric, target, threshold, test_sensitivity, test_specificity``).
    prediction_set : sequence of str, optional
        The classes of the split-conformal prediction set; more (or fewer) than one is
        coded "Indeterminate".
    coverage : float, optional
        The coverage the set was built for.
    encode_references : bool, optional
        How the source image references and the evidence are built. ``None`` (default): for a
        report without an image library (more than ``IMAGE_LIBRARY_MAX_IMAGES`` images) highdicom
        builds the report around the first image and the other references are added already
        encoded (:func:`_add_encoded_references`); highdicom deep-copied and re-walked every
        reference, 1.5 s of a 500-image series. ``False``: highdicom builds every reference (the
        same content; tests compare the two). ``True``: encoded references whatever the size,
        without an image library.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR

    Raises
    ------
    ValueError
        No source datasets, datasets from several studies, or probabilities for
        classes the card does not know.
    """
    if not source_datasets:
        raise ValueError("a classification SR needs at least one source image; pass the classified datasets")
    source_datasets = _with_type2_patient_and_study(source_datasets)
    studies = {str(ds.StudyInstanceUID) for ds in source_datasets}
    if len(studies) != 1:
        raise ValueError(f"the source images belong to {len(studies)} studies; build one SR per study")
    classes = list(card["task"]["classes"])
    unknown = set(probabilities) - set(classes)
    if unknown:
        raise ValueError(f"probabilities for classes {sorted(unknown)} not in the model card's {classes}")
    model_name = str(card["model"]["name"])
    version = f"{card.get('medclass_version', __version__)}"

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(device_name), name=device_name, manufacturer_name=MANUFACTURER, model_name=model_name[:64],
        ),
    )
    algorithm = hd.sr.AlgorithmIdentification(name=model_name, version=version)
    findings = [label] if isinstance(label, str) else list(label)
    evaluations = [hd.sr.QualitativeEvaluation(FINDING, class_code(card, f)) for f in findings]
    measurements = [
        hd.sr.Measurement(name=probability_concept(card, c), value=float(probabilities[c]), unit=PROBABILITY_UNIT,
                          algorithm_id=algorithm)
        for c in classes if c in probabilities
    ]
    for op in operating_points or []:
        measurements += operating_point_measurements(op, algorithm)
    if prediction_set is not None:
        decided = len(prediction_set) == 1
        evaluations.append(hd.sr.QualitativeEvaluation(
            CONFORMAL_RESULT, class_code(card, prediction_set[0]) if decided else INDETERMINATE))
        measurements.append(hd.sr.Measurement(name=CONFORMAL_SET_SIZE, value=float(len(prediction_set)),
                                              unit=RATIO_UNIT, algorithm_id=algorithm))
        if coverage is not None:
            measurements.append(hd.sr.Measurement(name=CONFORMAL_COVERAGE, value=float(coverage), unit=RATIO_UNIT,
                                                  algorithm_id=algorithm))
    encoded = len(source_datasets) > IMAGE_LIBRARY_MAX_IMAGES if encode_references is None else encode_references
    if encoded:
        # highdicom checks each series' first image (the others of a series share its kind), and the
        # report is built around the very first; the rest are added once it is built.
        firsts = {str(ds.SeriesInstanceUID): ds for ds in reversed(source_datasets)}
        for ds in firsts.values():
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
        source_images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(source_datasets[0])]
    else:
        source_images = [hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)
                         for ds in source_datasets]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{model_name} classification"[:64]),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=source_images,
    )
    context = hd.sr.ObservationContext(observer_person_context=None, observer_device_context=observer)
    report = None
    if not encoded and len(source_datasets) <= IMAGE_LIBRARY_MAX_IMAGES:
        try:
            report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=IMAGING_PROCEDURE,
                                             imaging_measurements=[group], referenced_images=list(source_datasets))
        except (AttributeError, KeyError, TypeError, ValueError):
            # highdicom's image library (TID 1600) wants modality-specific attributes that real
            # files lack (e.g. Imager Pixel Spacing of a digitised film mammogram).
            pass
    if report is None:
        # Without the image library (optional entries): the group's source image references and
        # the evidence sequence still name every image.
        report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=IMAGING_PROCEDURE,
                                         imaging_measurements=[group])
    with warnings.catch_warnings():
        # highdicom warns about odd person names *quoting the name*: patient data must not reach the log.
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        sr = _comprehensive_3d_sr(
            evidence=list(source_datasets[:1] if encoded else source_datasets), report=report,
            series_instance_uid=series_instance_uid,
            series_number=series_number, sop_instance_uid=sop_instance_uid, instance_number=instance_number,
            institution_name=institution_name, series_description=series_description, model_name=model_name,
            predecessors=predecessors, complete=complete)
    # Declare the private coding scheme, so that a reader can tell what 99MEDCLASS is.
    scheme = pydicom.Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = "SlicerMedClass model classes and outputs"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    if encoded and not _add_encoded_references(sr, source_datasets):
        warnings.warn("the encoded SR references differ from pydicom's encoding of highdicom's; highdicom "
                      "builds them (slower)", RuntimeWarning, stacklevel=2)
        return build_classification_sr(
            source_datasets, card, probabilities, label, series_number=series_number,
            instance_number=instance_number, device_name=device_name, series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_instance_uid, series_description=series_description,
            institution_name=institution_name, predecessors=predecessors, complete=complete,
            operating_points=operating_points, prediction_set=prediction_set, coverage=coverage,
            encode_references=False)
    return sr


#: Type 2 attributes of the Patient and General Study modules that highdicom reads from the first
#: source image: anonymised and exported data often lack them, and the report must still be built.
TYPE2_PATIENT_AND_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                           "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2_patient_and_study(datasets: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The datasets, the first replaced by a copy with empty Type 2 values where it has none.

    highdicom reads these attributes of the first source image as Python attributes
    (``AttributeError`` when absent) and validates sex, date and time (``ValueError``
    on a value such as ``2023-01-01``). A Type 2 attribute may be empty (PS3.5 7.4),
    so an absent or unusable value becomes an empty one; the caller's datasets are
    not changed.
    """
    from pydicom.valuerep import DA, TM

    first = datasets[0]
    fixes: dict[str, None] = {}
    for keyword in TYPE2_PATIENT_AND_STUDY:
        if keyword not in first:
            fixes[keyword] = None
            continue
        value = first.get(keyword)
        if value in (None, ""):
            continue
        try:
            if keyword == "PatientSex" and str(value).strip().upper() not in ("M", "F", "O"):
                raise ValueError("not M, F or O")
            if keyword in ("PatientBirthDate", "StudyDate"):
                DA(value)
            elif keyword == "StudyTime":
                TM(value)
        except (ValueError, TypeError):
            fixes[keyword] = None  # unusable; the value itself (patient data) is not logged
    if not fixes:
        return list(datasets)
    copy = pydicom.Dataset()
    copy.update(first)  # a new element dict: setting values below leaves the caller's dataset alone
    if getattr(first, "file_meta", None) is not None:
        copy.file_meta = first.file_meta
    for keyword, value in fixes.items():
        if keyword in copy:
            del copy[keyword]  # the element object is shared with the caller's dataset: replace, not change
        setattr(copy, keyword, value)
    return [copy, *list(datasets)[1:]]


class ClassificationSR(hd.sr.Comprehensive3DSR):
    """The report :func:`build_classification_sr` returns: a highdicom Comprehensive 3D SR whose
    :attr:`content` is parsed from the dataset when the references were added encoded."""

    @property
    def content(self):  # noqa: D102 - highdicom's
        if self._content is None:  # references added after highdicom built it: parse the whole tree once
            self._content = hd.sr.Comprehensive3DSR.from_dataset(self).content
        return self._content


def _comprehensive_3d_sr(evidence, report, series_instance_uid, series_number, sop_instance_uid, instance_number,
                         institution_name, series_description, model_name, predecessors=None,
                         complete=True) -> hd.sr.Comprehensive3DSR:
    return ClassificationSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=complete,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=(series_description or f"MedClass {model_name}")[:64],
        previous_versions=list(predecessors) if predecessors else None,
    )


# ---------------------------------------------------------------------- references added encoded
#
# A 500-image report is 500 IMAGE content items and 500 evidence items of a few UIDs each. highdicom
# deep-copies its content tree and walks it again for the evidence, and pydicom encodes the ~3000
# small datasets element by element: 1.9 of the 2.8 s a 500-image series took to classify. So above
# IMAGE_LIBRARY_MAX_IMAGES highdicom builds the report around the first image, and the measurement
# group's content and each series' evidence become pydicom raw data elements, encoded the way
# pydicom encodes them (Explicit VR Little Endian, the transfer syntax highdicom writes): highdicom's
# own items of the group by pydicom, the references by the few lines below (UIDs and codes are
# ASCII). pydicom parses a raw element when it is read, so the dataset reads as any other, and
# writes it as it is where the datasets declare that encoding as their own. Each build first does
# this for the first image alone and compares the bytes with pydicom's encoding of highdicom's
# report; when they differ (a future pydicom or highdicom) highdicom builds every reference.

_SOURCE_OF_MEASUREMENT = ("121112", "DCM", "Source of Measurement")
_ITEM = 0xFFFEE000
_RELATIONSHIP, _VALUE_TYPE, _CONCEPT_NAME, _CONTENT_SEQUENCE = 0x0040A010, 0x0040A040, 0x0040A043, 0x0040A730
_REF_SOP_SEQUENCE, _REF_SOP_CLASS, _REF_SOP_INSTANCE = 0x00081199, 0x00081150, 0x00081155
_CODE_VALUE, _CODING_SCHEME, _CODE_MEANING = 0x00080100, 0x00080102, 0x00080104


def _padded(value: str, pad: bytes) -> bytes:
    b = value.encode("ascii")
    return b + pad if len(b) % 2 else b


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One element, Explicit VR Little Endian: a short VR (CS, SH, LO, UI) or a sequence of defined length."""
    if vr == b"SQ":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _item(body: bytes) -> bytes:
    """A sequence item of defined length, as pydicom writes one."""
    return struct.pack("<HHI", _ITEM >> 16, _ITEM & 0xFFFF, len(body)) + body


def _raw(tag: int, value: bytes) -> RawDataElement:
    """A sequence whose items are already encoded."""
    return RawDataElement(BaseTag(tag), "SQ", len(value), value, 0, False, True)


def _sop_reference(sop_class: str, sop_instance: str) -> bytes:
    """An item of a Referenced SOP Sequence, encoded."""
    return _item(_element(_REF_SOP_CLASS, b"UI", _padded(sop_class, b"\0"))
                 + _element(_REF_SOP_INSTANCE, b"UI", _padded(sop_instance, b"\0")))


_CONCEPT_ITEM = _item(b"".join(_element(t, vr, _padded(v, b" ")) for t, vr, v in zip(
    (_CODE_VALUE, _CODING_SCHEME, _CODE_MEANING), (b"SH", b"SH", b"LO"), _SOURCE_OF_MEASUREMENT)))


def _source_image(sop_class: str, sop_instance: str) -> bytes:
    """A TID 1501 "Source of Measurement" IMAGE content item, as highdicom builds it, encoded (tag order)."""
    return _item(_element(_REF_SOP_SEQUENCE, b"SQ", _sop_reference(sop_class, sop_instance))
                 + _element(_RELATIONSHIP, b"CS", b"CONTAINS") + _element(_VALUE_TYPE, b"CS", b"IMAGE ")
                 + _element(_CONCEPT_NAME, b"SQ", _CONCEPT_ITEM))


def _is_source_image(item: pydicom.Dataset) -> bool:
    return (item.get("ValueType") == "IMAGE" and "ConceptNameCodeSequence" in item
            and item.ConceptNameCodeSequence[0].CodeValue == _SOURCE_OF_MEASUREMENT[0])


def _declare_encoding(ds: pydicom.Dataset) -> None:
    """Declare Explicit VR Little Endian as the encoding of ``ds`` and of every dataset under it.

    pydicom writes raw elements as they are only under datasets that declare the encoding
    being written; otherwise it parses each one first. A dataset holding an element of
    ambiguous VR is left to pydicom's correction (its raw elements are then parsed: slower,
    not wrong).
    """
    ambiguous = False
    for elem in ds.elements():  # raw elements stay raw
        if elem.VR == VR.SQ and not elem.is_raw:
            for item in elem.value:
                _declare_encoding(item)
        ambiguous = ambiguous or elem.VR in AMBIGUOUS_VR
    if not ambiguous:
        ds.set_original_encoding(False, True, ds._character_set)


def _add_encoded_references(sr: ClassificationSR, sources: Sequence[pydicom.Dataset]) -> bool:
    """Add the source image references and the evidence of ``sources[1:]`` to a report built on ``sources[0]``.

    The content equals highdicom's for all of ``sources``: one IMAGE item per source, in order,
    where highdicom puts the first; the Current Requested Procedure Evidence Sequence with one
    item per series (in order of first appearance) naming each instance once. Returns ``False``
    when the same done for ``sources[0]`` alone does not encode to the bytes pydicom writes for
    highdicom's report (then build it with highdicom).
    """
    from pydicom.charset import convert_encodings, default_encoding

    groups = [item for container in sr.ContentSequence if container.get("ValueType") == "CONTAINER"
              for item in container.get("ContentSequence", []) if item.get("ValueType") == "CONTAINER"
              and any(_is_source_image(i) for i in item.get("ContentSequence", []))]
    evidence = sr.get("CurrentRequestedProcedureEvidenceSequence", [])
    if len(groups) != 1 or len(evidence) != 1 or "PertinentOtherEvidenceSequence" in sr:
        return False
    group, study = groups[0], evidence[0]
    items = list(group.ContentSequence)
    at = [k for k, item in enumerate(items) if _is_source_image(item)]
    if len(at) != 1:
        return False
    # Nested items are written in the report's character set (pydicom passes it down as it writes). A
    # dataset parses its raw elements in its parent's character set, which pydicom records only for
    # datasets it read: record it for the group, or its text would be read back as ISO 8859 in memory.
    charset = convert_encodings(sr.get("SpecificCharacterSet", default_encoding))
    group._parent_encoding = charset
    before = b"".join(_encoding_as_item(i, charset) for i in items[:at[0]])
    after = b"".join(_encoding_as_item(i, charset) for i in items[at[0] + 1:])

    # Each source's UIDs, read once (attribute access on 500 datasets adds up).
    uids = [(str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in sources]

    def add(uids: list[tuple[str, str, str]]) -> None:
        images = b"".join(_source_image(sop_class, sop) for _, sop_class, sop in uids)
        group[_CONTENT_SEQUENCE] = _raw(_CONTENT_SEQUENCE, before + images + after)
        series: dict[str, list[bytes]] = {}
        seen: set[str] = set()
        for series_uid, sop_class, sop in uids:
            if sop not in seen:  # highdicom names an instance once in the evidence
                seen.add(sop)
                series.setdefault(series_uid, []).append(_sop_reference(sop_class, sop))
        study.ReferencedSeriesSequence = [pydicom.Dataset() for _ in series]
        for item, (series_uid, refs) in zip(study.ReferencedSeriesSequence, series.items()):
            item.SeriesInstanceUID = series_uid
            item[_REF_SOP_SEQUENCE] = _raw(_REF_SOP_SEQUENCE, b"".join(refs))
        _declare_encoding(sr)

    def encoded() -> bytes:  # the two datasets changed, as pydicom writes them in the report
        return _encoding_as_item(group, charset) + _encoding_as_item(study, charset)

    expected = encoded()
    add(uids[:1])
    if encoded() != expected:
        return False
    add(uids)
    sr._content = None  # ClassificationSR.content parses the whole tree when asked
    return True


def _encoding_as_item(ds: pydicom.Dataset, charset: list[str]) -> bytes:
    """pydicom's encoding of ``ds`` as an item of a sequence written in ``charset``."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_sequence_item

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_sequence_item(fp, ds, charset)
    return fp.getvalue()


def report_reference(study_uid: str, series_uid: str, sop_uid: str,
                     sop_class: str = pydicom.uid.Comprehensive3DSRStorage) -> pydicom.Dataset:
    """The four UIDs that name an earlier report, as ``predecessors`` of :func:`build_classification_sr` takes."""
    ref = pydicom.Dataset()
    ref.StudyInstanceUID, ref.SeriesInstanceUID = study_uid, series_uid
    ref.SOPInstanceUID, ref.SOPClassUID = sop_uid, sop_class
    return ref


def read_classification_sr(ds: pydicom.Dataset) -> dict[str, Any]:
    """Parse a report written by :func:`build_classification_sr` back into values.

    Parameters
    ----------
    ds : pydicom.Dataset
        The SR instance (e.g. read back from the PACS).

    Returns
    -------
    dict
        ``findings`` (list of ``(scheme, value, meaning)``), ``probabilities``
        (meaning of the numeric item to value), ``algorithm`` (name, version),
        ``study_uid``, ``verification``, ``complete`` (the CompletionFlag is COMPLETE),
        ``predecessors`` (SOP Instance UIDs in the Predecessor Documents Sequence);
        ``measurements`` (every other numeric item: operating point, conformal coverage and
        set size) and ``conformal`` (the value of the conformal result, or ``None``).
    """
    report = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    out: dict[str, Any] = {"study_uid": str(ds.StudyInstanceUID), "verification": str(ds.VerificationFlag),
                           "findings": [], "probabilities": {}, "algorithm": None, "measurements": {},
                           "conformal": None}
    for group in report.get_image_measurement_groups():
        for ev in group.get_qualitative_evaluations():
            v = ev.value
            if ev.name.value == CONFORMAL_RESULT.value:
                out["conformal"] = (v.scheme_designator, v.value, v.meaning)
            else:
                out["findings"].append((v.scheme_designator, v.value, v.meaning))
        for m in group.get_measurements():
            if m.name.meaning.startswith("Probability of "):
                out["probabilities"][m.name.meaning.removeprefix("Probability of ")] = float(m.value)
            else:
                out["measurements"][m.name.meaning] = float(m.value)
    out["algorithm"] = _algorithm(ds.ContentSequence)
    out["complete"] = str(ds.get("CompletionFlag", "")) == "COMPLETE"
    out["predecessors"] = [str(i.ReferencedSOPInstanceUID) for st in ds.get("PredecessorDocumentsSequence", [])
                           for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    return out


def _algorithm(items) -> tuple[str, str | None] | None:
    """Algorithm Name (DCM 111001) and Version (DCM 111003), searched depth first."""
    name = version = None
    for item in items:
        code = item.ConceptNameCodeSequence[0].CodeValue if "ConceptNameCodeSequence" in item else None
        if code == "111001":
            name = str(item.TextValue)
        elif code == "111003":
            version = str(item.TextValue)
        if name and version:
            return name, version
        if "ContentSequence" in item:
            found = _algorithm(item.ContentSequence)
            if found:
                return found
    return (name, version) if name else None
