"""What a PEM certificate and key file hold, read without a new dependency.

The ssl module checks that a key matches its certificate (load_cert_chain) but has no public
way to read a certificate file's validity dates, so a few lines of DER reading do it: a
certificate is SEQUENCE { tbsCertificate SEQUENCE { [0] version?, serialNumber, signature,
issuer, validity SEQUENCE { notBefore, notAfter }, ... }, ... } (RFC 5280, 4.1). Pure functions.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime, timezone

PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s*(.*?)\s*-----END CERTIFICATE-----", re.DOTALL
)
PEM_PRIVATE_KEY = re.compile(
    rb"-----BEGIN ((?:RSA |EC |DSA |ENCRYPTED |OPENSSH )?PRIVATE KEY)-----"
)
SEQUENCE, UTC_TIME, GENERALIZED_TIME, EXPLICIT_0 = 0x30, 0x17, 0x18, 0xA0


class CertificateError(ValueError):
    pass


def pem_certificates(data: bytes) -> list[bytes]:
    """The DER bytes of every certificate in a PEM file, in file order."""
    ders = []
    for match in PEM_CERTIFICATE.finditer(data):
        try:
            ders.append(base64.b64decode(b"".join(match.group(1).split()), validate=True))
        except binascii.Error as exc:
            raise CertificateError(f"a PEM certificate block is not valid base64 ({exc})") from exc
    return ders


def private_key_kind(data: bytes) -> str | None:
    """ "RSA PRIVATE KEY", "ENCRYPTED PRIVATE KEY", ...; None when the file holds no PEM key.
    A passphrase-protected traditional key (Proc-Type: 4,ENCRYPTED) counts as encrypted."""
    match = PEM_PRIVATE_KEY.search(data)
    if match is None:
        return None
    if b"Proc-Type: 4,ENCRYPTED" in data[match.end() : match.end() + 200]:
        return "ENCRYPTED " + match.group(1).decode()
    return match.group(1).decode()


def _element(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start, end) of the contents of the DER element that starts at `pos`."""
    if pos + 2 > len(der):
        raise CertificateError("the certificate is truncated")
    tag, length = der[pos], der[pos + 1]
    pos += 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or pos + count > len(der):
            raise CertificateError("the certificate has a bad DER length")
        length = int.from_bytes(der[pos : pos + count], "big")
        pos += count
    if pos + length > len(der):
        raise CertificateError("the certificate is truncated")
    return tag, pos, pos + length


def _expect(der: bytes, pos: int, tag: int, what: str) -> tuple[int, int]:
    found, start, end = _element(der, pos)
    if found != tag:
        raise CertificateError(f"not an X.509 certificate ({what})")
    return start, end


def _time(tag: int, raw: bytes) -> datetime:
    text = raw.decode("ascii", "replace")
    if tag == UTC_TIME and len(text) == 13:
        # RFC 5280: YY below 50 is 20YY, else 19YY.
        text = ("19" if int(text[:2]) >= 50 else "20") + text
    elif tag != GENERALIZED_TIME or len(text) != 15:
        raise CertificateError(f"unsupported validity time {text!r}")
    try:
        return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError as exc:
        raise CertificateError(f"bad validity time {text!r}") from exc


def validity(der: bytes) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of a DER certificate, in UTC."""
    start, _ = _expect(der, 0, SEQUENCE, "Certificate")
    pos, _ = _expect(der, start, SEQUENCE, "tbsCertificate")
    tag, _, after = _element(der, pos)
    if tag == EXPLICIT_0:  # version, absent in v1 certificates
        pos = after
    for _field in ("serialNumber", "signature", "issuer"):
        _, _, pos = _element(der, pos)
    start, _ = _expect(der, pos, SEQUENCE, "validity")
    tag, begin, end = _element(der, start)
    not_before = _time(tag, der[begin:end])
    tag, begin, end = _element(der, end)
    return not_before, _time(tag, der[begin:end])
