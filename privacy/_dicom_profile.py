"""Applying the DICOM allow-list of :mod:`._dicom_rules` to one instance, failing closed.

:class:`Cleaner` builds a *new* dataset from the allow-listed attributes of the input
(walking every kept sequence with that sequence's own table), so anything not named there
(private tags, free text, names, dates, references, unknown attributes) is never copied.
UIDs and identifiers are replaced with HMACs keyed by the site secret, so the same input
value always maps to the same pseudonym at this site (the instances stay one series; a
specimen keeps its identity across the instances). Codes are kept only when they are in
DICOM's code dictionaries, with their meanings rewritten from them. The cleaner remembers
every removed value, for the final check of the written copy.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pipeline import DeidentificationError

from ._dicom_rules import DEID_METHOD, DEID_OPTIONS, IMAGE_TYPE_VALUES, TOP_LEVEL, Rule

__all__ = ["Cleaner", "check_allow_listed", "walk_strings"]

_DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000"}
_DUMMY_TEXT = "DEIDENTIFIED"
_REGISTERED_UID = "1.2.840.10008."  # DICOM's own UIDs (classes, syntaxes): not about a patient
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_CS = re.compile(r"[A-Z0-9 _]{0,16}")
_BINARY_NUMBER_VRS = {"US", "UL", "SS", "SL", "UV", "SV", "FL", "FD", "AT"}
_BINARY_VRS = {"OB", "OW", "OV", "OF", "OD", "OL"}
_CONVERSION_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError, LookupError)
_SPECIMEN_IDENTIFIER = ("DCM", "121041")
_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{8,}")


@cache
def _code_meanings() -> dict[tuple[str, str], str]:
    """(scheme, code value) -> meaning for every concept in pydicom's DICOM code dictionaries."""
    from pydicom.sr.codedict import Collection, codes

    meanings: dict[tuple[str, str], str] = {}
    for scheme in codes.schemes():
        for code in Collection(scheme).concepts.values():
            meanings[(str(code.scheme_designator), str(code.value))] = str(code.meaning)[:64]
    return meanings


def _values(elem: Any) -> list[Any]:
    value = elem.value
    if elem.VR == "SQ":
        return list(value or [])
    if value is None or value == "":
        return []
    if elem.VM > 1 and not isinstance(value, (str, bytes)):
        return list(value)
    return [value]


def _dictionary_vrs(tag: Any) -> set[str]:
    from pydicom.datadict import dictionary_VR

    return set(dictionary_VR(tag).split(" or "))


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


@dataclass
class Cleaner:
    """Builds de-identified datasets; keeps what it removed (``removed_values``, ``fields_removed``)."""

    secret: bytes
    removed_values: set[str] = field(default_factory=set)
    fields_removed: int = 0

    def uid(self, old: str) -> str:
        """``2.25.<128-bit HMAC of the old UID>``: stable at this site, meaningless elsewhere."""
        mac = hmac.new(self.secret, b"wsiflow-deid-uid\0" + old.encode("ascii"), hashlib.sha256).digest()
        return f"2.25.{int.from_bytes(mac[:16], 'big')}"

    def pseudonym(self, old: str) -> str:
        """16 hex digits of an HMAC of an identifier (fits SH and LO; stable at this site)."""
        mac = hmac.new(self.secret, b"wsiflow-deid-id\0" + old.strip().encode("utf-8"), hashlib.sha256)
        return mac.hexdigest()[:16].upper()

    # ------------------------------------------------------------------ remembering

    def _remember(self, ds: Any, tag: Any, *, count: bool = True) -> None:
        """Count one removed (or replaced) element and keep its text for the final check."""
        self.fields_removed += count
        try:
            texts = list(_strings(ds[tag]))
        except _CONVERSION_ERRORS:
            raw = ds.get_item(tag)
            data = raw.value if isinstance(getattr(raw, "value", None), bytes) else b""
            texts = [m.decode("ascii") for m in _PRINTABLE_RUN.findall(data)]
        self.removed_values.update(t.strip() for t in texts if len(t.strip()) >= 4)

    def _remember_text(self, text: str) -> None:
        if len(text.strip()) >= 4:
            self.removed_values.add(text.strip())

    # ------------------------------------------------------------------ the walk

    def clean_instance(self, ds: Any) -> Any:
        """A new dataset holding only the allow-listed attributes of ``ds``, de-identified."""
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        out = self._clean(ds, TOP_LEVEL, "the top level")
        # Checked before: a level marked as showing burned-in text or the label is refused.
        out.BurnedInAnnotation = "NO"
        out.SpecimenLabelInImage = "NO"
        out.PatientIdentityRemoved = "YES"
        out.LongitudinalTemporalInformationModified = "REMOVED"
        out.DeidentificationMethod = DEID_METHOD
        items = []
        for value, meaning in DEID_OPTIONS:
            code = Dataset()
            code.CodeValue = value
            code.CodingSchemeDesignator = "DCM"
            code.CodeMeaning = meaning
            items.append(code)
        out.DeidentificationMethodCodeSequence = Sequence(items)
        return out

    def _clean(self, ds: Any, rules: Mapping[str, Rule], where: str) -> Any:
        from pydicom.datadict import dictionary_VR, keyword_for_tag
        from pydicom.dataset import Dataset

        out = Dataset()
        for raw in ds.elements():
            tag = raw.tag
            keyword = "" if tag.is_private else keyword_for_tag(tag)
            rule = rules.get(keyword) if keyword else None
            if rule is None or rule.kind == "fixed":
                self._remember(ds, tag)  # not on the allow-list: never copied
                continue
            new = self._apply(ds, tag, keyword, rule, where)
            if new is not None:
                out.add(new)
        for keyword, rule in rules.items():
            if rule.kind == "empty" and keyword not in out:
                vr = dictionary_VR(keyword)
                out.add_new(keyword, vr, [] if vr == "SQ" else "")  # Type 2: present, empty
        return out

    def _bad(self, ds: Any, tag: Any, keyword: str, rule: Rule, where: str) -> Any:
        """A kept attribute whose value fails its check: fail closed, write it empty, or drop it."""
        from pydicom.datadict import dictionary_VR
        from pydicom.dataelem import DataElement

        if rule.bad == "fail":
            raise DeidentificationError(
                f"the DICOM attribute {keyword} ({where}) has a value deid cannot classify; refusing to guess"
            )
        self._remember(ds, tag)
        if rule.bad == "empty":
            vr = dictionary_VR(keyword)
            return DataElement(tag, vr, [] if vr == "SQ" else "")
        return None

    def _apply(self, ds: Any, tag: Any, keyword: str, rule: Rule, where: str) -> Any:
        from pydicom.dataelem import DataElement
        from pydicom.sequence import Sequence

        try:
            elem = ds[tag]
        except _CONVERSION_ERRORS:
            return self._bad(ds, tag, keyword, rule, where)
        if elem.VR not in _dictionary_vrs(tag):
            return self._bad(ds, tag, keyword, rule, where)
        kind = rule.kind
        values = _values(elem)
        if kind == "empty":
            if values:
                self._remember(ds, tag)
            return DataElement(tag, elem.VR, [] if elem.VR == "SQ" else "")
        if kind == "dummy":
            if values:
                self._remember(ds, tag)
            return DataElement(tag, elem.VR, _DUMMY.get(elem.VR, _DUMMY_TEXT))
        if kind == "pseudonym":
            if not values or not str(values[0]).strip():
                return DataElement(tag, elem.VR, "")  # nothing to hide (writers use "" when unknown)
            if len(values) != 1:
                return self._bad(ds, tag, keyword, rule, where)
            self._remember(ds, tag)
            return DataElement(tag, elem.VR, self.pseudonym(str(values[0])))
        if kind == "uid":
            if not values or not all(_UID.fullmatch(str(v)) for v in values):
                return self._bad(ds, tag, keyword, rule, where)
            new = [self._new_uid(str(v)) for v in values]
            return DataElement(tag, elem.VR, new if len(new) > 1 else new[0])
        if kind in ("number", "enum", "image_type", "pattern", "binary"):
            return elem if self._value_ok(elem, rule, values) else self._bad(ds, tag, keyword, rule, where)
        if kind == "sequence":
            items = [self._clean(item, rule.items, f"in {keyword}") for item in values]
            kept = [item for item in items if len(item)]
            if not kept:
                return self._empty_sequence(ds, tag, keyword, rule, where)
            return DataElement(tag, "SQ", Sequence(kept))
        if kind == "codes":
            codes = [self._code(item) for item in values]
            # Meanings are rewritten: the input's (free text) must not come back either.
            self._remember(ds, tag, count=any(code is None for code in codes))
            kept = [code for code in codes if code is not None]
            if not kept:
                return self._empty_sequence(ds, tag, keyword, rule, where)
            return DataElement(tag, "SQ", Sequence(kept))
        if kind == "content":
            steps = [self._content_item(item) for item in values]
            self._remember(ds, tag, count=any(step is None for step in steps))
            kept = [step for step in steps if step is not None]
            return DataElement(tag, "SQ", Sequence(kept)) if kept else None
        raise DeidentificationError(f"deid has no way to write {keyword}; refusing to guess")  # a table typo

    def _empty_sequence(self, ds: Any, tag: Any, keyword: str, rule: Rule, where: str) -> Any:
        """Nothing of a sequence survived: an empty Type 2 sequence, a removal, or fail closed."""
        from pydicom.dataelem import DataElement
        from pydicom.sequence import Sequence

        if rule.bad == "fail" and len(ds[tag].value):
            raise DeidentificationError(
                f"nothing of the DICOM sequence {keyword} ({where}) can be kept safely, and it is needed; "
                "refusing to guess"
            )
        if rule.bad == "empty":
            return DataElement(tag, "SQ", Sequence([]))
        return None

    def _value_ok(self, elem: Any, rule: Rule, values: list[Any]) -> bool:
        vr = elem.VR
        if rule.kind == "binary":
            return vr in _BINARY_VRS
        if rule.kind == "number":
            if vr in _BINARY_NUMBER_VRS:
                return True
            return vr in ("DS", "IS") and all(_is_number(str(v)) for v in values)
        texts = [str(v) for v in values]
        if rule.kind == "pattern":
            return all(re.fullmatch(rule.pattern, t) for t in texts)
        if vr == "CS" and not all(_CS.fullmatch(t) for t in texts):
            return False
        if rule.kind == "image_type":
            return len(texts) == len(IMAGE_TYPE_VALUES) and all(
                t in allowed for t, allowed in zip(texts, IMAGE_TYPE_VALUES, strict=True)
            )
        return all(t in rule.values for t in texts)

    def _new_uid(self, old: str) -> str:
        if old.startswith(_REGISTERED_UID):
            return old
        self.removed_values.add(old)
        return self.uid(old)

    def _code(self, item: Any) -> Any:
        """A code item rewritten from DICOM's dictionaries, or None (unknown code, or not a code)."""
        from pydicom.dataset import Dataset

        try:
            key = (str(item.get("CodingSchemeDesignator", "")), str(item.get("CodeValue", "")))
        except _CONVERSION_ERRORS:
            return None
        meaning = _code_meanings().get(key)
        if meaning is None:
            return None
        code = Dataset()
        code.CodeValue = key[1]
        code.CodingSchemeDesignator = key[0]
        code.CodeMeaning = meaning
        return code

    def _first_code(self, item: Any, keyword: str) -> Any:
        try:
            sequence = item.get(keyword)
        except _CONVERSION_ERRORS:
            return None
        if not sequence or len(sequence) != 1:
            return None
        return self._code(sequence[0])

    def _content_item(self, item: Any) -> Any:
        """A specimen preparation content item kept in coded form, or None (dropped).

        CODE items whose name and value are dictionary codes are kept; the specimen
        identifier (a TEXT item) becomes its pseudonym, as in SpecimenIdentifier.
        Everything else (free text, dates, names, numbers, nested items) is dropped.
        """
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        try:
            value_type = str(item.get("ValueType", ""))
        except _CONVERSION_ERRORS:
            return None
        name = self._first_code(item, "ConceptNameCodeSequence")
        if name is None:
            return None
        out = Dataset()
        out.ValueType = value_type
        out.ConceptNameCodeSequence = Sequence([name])
        if value_type == "CODE":
            concept = self._first_code(item, "ConceptCodeSequence")
            if concept is None:
                return None
            out.ConceptCodeSequence = Sequence([concept])
            return out
        if value_type == "TEXT" and (name.CodingSchemeDesignator, name.CodeValue) == _SPECIMEN_IDENTIFIER:
            try:
                text = str(item.get("TextValue", ""))
            except _CONVERSION_ERRORS:
                return None
            if not text.strip():
                return None
            self._remember_text(text)
            out.TextValue = self.pseudonym(text)
            return out
        return None


def check_allow_listed(ds: Any, rules: Mapping[str, Rule] = TOP_LEVEL) -> None:
    """Fail unless every element of a written dataset, at every depth, is on the allow-list."""
    from pydicom.datadict import keyword_for_tag

    for elem in ds:
        keyword = "" if elem.tag.is_private else keyword_for_tag(elem.tag)
        rule = rules.get(keyword) if keyword else None
        if rule is None:
            raise DeidentificationError("the copy holds a DICOM element that is not on the allow-list")
        if rule.kind == "sequence":
            for item in elem.value:
                check_allow_listed(item, rule.items)
        elif rule.kind in ("codes", "content", "fixed") and elem.VR == "SQ":
            for item in elem.value:
                check_allow_listed(item, _CODED_ITEM)


_CODED_ITEM: dict[str, Rule] = {
    key: Rule("fixed")
    for key in ("CodeValue", "CodingSchemeDesignator", "CodeMeaning", "ValueType", "TextValue",
                "ConceptNameCodeSequence", "ConceptCodeSequence")
}


def _strings(elem: Any) -> Iterator[str]:
    if elem.VR == "SQ":
        for item in elem.value:
            yield from walk_strings(item)
        return
    for value in _values(elem):
        if isinstance(value, (bytes, bytearray)):
            yield from (m.decode("ascii") for m in _PRINTABLE_RUN.findall(bytes(value)))
        else:
            yield str(value)


def walk_strings(ds: Any) -> Iterator[str]:
    """Every string value in ``ds``, recursively through sequences."""
    for elem in ds:
        yield from _strings(elem)
