"""What both scenario kinds check and encode on the wire: a reply's records and a privacy record."""

from __future__ import annotations

from flwr.app import ConfigRecord, RecordDict

from fedpsg.dp.accounting import PrivacyRecord


def check_reply_keys(content: RecordDict, allowed: frozenset[str]) -> None:
    """A party's reply carries only the records its protocol allows: nothing else may leave it."""
    unexpected = set(content.keys()) - allowed
    if unexpected:
        raise ValueError(f"a party's reply may only carry {sorted(allowed)}, got extra {sorted(unexpected)}")


def privacy_config(record: PrivacyRecord, **extra: int) -> ConfigRecord:
    """A privacy record as a Flower ConfigRecord (unset fields left out), with ``extra`` counts."""
    return ConfigRecord({**{k: v for k, v in record.to_dict().items() if v is not None}, **extra})


def read_privacy(content: RecordDict) -> tuple[PrivacyRecord, dict]:
    """The reply's privacy record, and every value of its ``privacy`` ConfigRecord."""
    values = dict(content.config_records["privacy"])
    return PrivacyRecord.from_dict(values), values
