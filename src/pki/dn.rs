//! A certificate's subject as QEMU's `authz-simple` compares it.
//!
//! QEMU 7.2 asks GnuTLS for the distinguished name of the certificate a TLS client presented
//! (`gnutls_x509_crt_get_dn`, in `crypto/tlssession.c`) and compares that string, byte for
//! byte, with the `identity` of the `authz-simple` object `tls-authz` names. So the identity
//! must be GnuTLS's string, not another library's rendering of the same name (x509-parser writes
//! `C=US, O=Acme, CN=host-a`; GnuTLS `C=US,O=Acme,CN=host-a`). [`qemu_authz_dn`] makes GnuTLS's
//! string from the DER of the subject, following what GnuTLS 3.7 (Debian 12's, which this QEMU
//! uses) does in `lib/x509/dn.c` and `lib/x509/common.c`:
//!
//! 1. The RDNs in the order the certificate holds them (GnuTLS's compatibility order: not
//!    RFC 4514's reversed one), joined by `,`; the attributes of a multi-valued RDN, in their
//!    encoded order, joined by `+`.
//! 2. Each attribute as `NAME=value`: GnuTLS's short name for the attribute type ([`NAMES`]:
//!    `CN`, `O`, `OU`, `C`, `L`, `ST`, `DC`, `UID`, `EMAIL`, ...), else its dotted OID.
//! 3. The value decoded as the string type(s) GnuTLS expects for that attribute ([`Expect`]):
//!    a DirectoryString for `CN`, `O`, `OU`, ... (UTF8String and PrintableString as they are,
//!    a TeletexString only when all printable ASCII, a BMPString converted to UTF-8, a
//!    UniversalString never); exactly one type for the others (`C` a PrintableString, `DC` and
//!    `EMAIL` an IA5String). A value GnuTLS does not decode (another string type, an unknown
//!    attribute, an embedded NUL) is written `#` and the hex of its whole DER (`C=#0c025553`
//!    for a UTF8String `US`); a DirectoryString it decodes but cannot print is `\#` and the hex
//!    of its content.
//! 4. Decoded text escaped RFC 4514's way with `\`: `,` `+` `"` `\` `<` `>` `;` anywhere, `#`
//!    and space first, space last. Anything else (UTF-8, control characters) stays as it is.
//!
//! Whatever QEMU could not be told as a QMP string, or GnuTLS refuses, is an error here, never
//! a guess: a value that is not UTF-8, an empty subject or RDN, an empty DirectoryString, a NUL
//! in an OCTET STRING value, and DER this module does not read exactly as libtasn1 does
//! (non-minimal lengths or OID arcs, multi-byte tags). Better a clear refusal before the
//! migration than a `tls-authz` that QEMU never matches, after the destination was prepared.
//!
//! Each rule was checked against the real library: unit tests hold strings GnuTLS printed, and
//! an integration test feeds generated and mutated names to `libgnutls.so.30` and to this
//! module and requires the same string (or a refusal here).

use std::fmt::Write as _;

/// Why a subject cannot be given to QEMU as an `authz-simple` identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DnError {
    /// Not a certificate x509-parser can read.
    #[error("not a readable X.509 certificate")]
    Certificate,
    /// The subject's DER is malformed, or uses an encoding this module does not follow.
    #[error("the subject's DER is unusable ({0})")]
    Der(&'static str),
    /// No attribute at all: GnuTLS gives QEMU no name (QEMU then refuses the handshake).
    #[error("the subject is empty")]
    Empty,
    /// An attribute whose value GnuTLS refuses, so that it gives QEMU no name.
    #[error("GnuTLS refuses the value of {attr} ({why})")]
    Refused { attr: String, why: &'static str },
    /// GnuTLS would hand QEMU bytes that are not UTF-8, which no QMP string can carry.
    #[error("the value of {attr} is not UTF-8")]
    NotUtf8 { attr: String },
}

/// The string types GnuTLS decodes for an attribute type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// X.520 DirectoryString: TeletexString, PrintableString, UniversalString, UTF8String or
    /// BMPString (never empty).
    Directory,
    /// PKCS #9 challengePassword: PrintableString or UTF8String.
    ChallengePassword,
    /// Exactly this universal tag (a primitive string type).
    Only(u8),
}

const UTF8_STRING: u8 = 0x0c;
const NUMERIC_STRING: u8 = 0x12;
const PRINTABLE_STRING: u8 = 0x13;
const TELETEX_STRING: u8 = 0x14;
const IA5_STRING: u8 = 0x16;
const UNIVERSAL_STRING: u8 = 0x1c;
const BMP_STRING: u8 = 0x1e;
const OCTET_STRING: u8 = 0x04;
const OID: u8 = 0x06;
const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;

/// GnuTLS 3.7's table of the attribute types it knows (`_oid2str` in `lib/x509/common.c`):
/// OID, the name it prints (`None`: it prints the OID), the string types it decodes.
pub const NAMES: &[(&str, Option<&str>, Expect)] = {
    use Expect::{ChallengePassword, Directory, Only};
    &[
        ("1.3.6.1.5.5.7.9.2", Some("placeOfBirth"), Directory),
        ("1.3.6.1.5.5.7.9.3", Some("gender"), Only(PRINTABLE_STRING)),
        (
            "1.3.6.1.5.5.7.9.4",
            Some("countryOfCitizenship"),
            Only(PRINTABLE_STRING),
        ),
        (
            "1.3.6.1.5.5.7.9.5",
            Some("countryOfResidence"),
            Only(PRINTABLE_STRING),
        ),
        ("2.5.4.6", Some("C"), Only(PRINTABLE_STRING)),
        ("2.5.4.9", Some("street"), Directory),
        ("2.5.4.12", Some("title"), Directory),
        ("2.5.4.10", Some("O"), Directory),
        ("2.5.4.11", Some("OU"), Directory),
        ("2.5.4.3", Some("CN"), Directory),
        ("2.5.4.7", Some("L"), Directory),
        ("2.5.4.8", Some("ST"), Directory),
        ("2.5.4.13", Some("description"), Directory),
        ("2.5.4.5", Some("serialNumber"), Only(PRINTABLE_STRING)),
        ("2.5.4.20", Some("telephoneNumber"), Only(PRINTABLE_STRING)),
        ("2.5.4.4", Some("surName"), Directory),
        ("2.5.4.43", Some("initials"), Directory),
        ("2.5.4.44", Some("generationQualifier"), Directory),
        ("2.5.4.42", Some("givenName"), Directory),
        ("2.5.4.65", Some("pseudonym"), Directory),
        ("2.5.4.46", Some("dnQualifier"), Only(PRINTABLE_STRING)),
        ("2.5.4.17", Some("postalCode"), Directory),
        ("2.5.4.41", Some("name"), Directory),
        ("2.5.4.15", Some("businessCategory"), Directory),
        ("0.9.2342.19200300.100.1.25", Some("DC"), Only(IA5_STRING)),
        ("0.9.2342.19200300.100.1.1", Some("UID"), Directory),
        (
            "1.2.840.113556.1.4.656",
            Some("userPrincipalName"),
            Directory,
        ),
        (
            "1.3.6.1.4.1.311.60.2.1.1",
            Some("jurisdictionOfIncorporationLocalityName"),
            Directory,
        ),
        (
            "1.3.6.1.4.1.311.60.2.1.2",
            Some("jurisdictionOfIncorporationStateOrProvinceName"),
            Directory,
        ),
        (
            "1.3.6.1.4.1.311.60.2.1.3",
            Some("jurisdictionOfIncorporationCountryName"),
            Only(PRINTABLE_STRING),
        ),
        ("1.2.840.113549.1.9.1", Some("EMAIL"), Only(IA5_STRING)),
        ("1.2.840.113549.1.9.7", None, ChallengePassword),
        ("1.2.840.113549.1.9.20", None, Only(BMP_STRING)),
        ("1.2.840.113549.1.9.21", None, Only(OCTET_STRING)),
        ("1.2.840.113549.1.9.4", None, Only(OCTET_STRING)),
        ("1.3.6.1.5.5.7.8.5", Some("XmppAddr"), Only(UTF8_STRING)),
        ("1.2.643.100.1", Some("OGRN"), Only(NUMERIC_STRING)),
        ("1.2.643.100.3", Some("SNILS"), Only(NUMERIC_STRING)),
        ("1.2.643.100.5", Some("OGRNIP"), Only(NUMERIC_STRING)),
        ("1.2.643.3.131.1.1", Some("INN"), Only(NUMERIC_STRING)),
    ]
};

/// Longest dotted OID GnuTLS reads into its buffer (`MAX_OID_SIZE` less the NUL); longer ones
/// are refused rather than guessed at.
const MAX_OID_CHARS: usize = 127;

/// The subject of the DER certificate `cert` as QEMU's `authz-simple` compares it.
pub fn certificate_authz_dn(cert: &[u8]) -> Result<String, DnError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|_| DnError::Certificate)?;
    qemu_authz_dn(parsed.subject().as_raw())
}

/// The DER `Name` (a certificate's subject) as GnuTLS prints it for QEMU (see the module
/// documentation).
pub fn qemu_authz_dn(name: &[u8]) -> Result<String, DnError> {
    let mut outer = Reader::new(name);
    let rdns = outer.expect(SEQUENCE)?;
    outer.finish()?;
    let mut rdns = Reader::new(rdns);
    let mut out = Vec::new();
    while !rdns.is_empty() {
        let mut avas = Reader::new(rdns.expect(SET)?);
        if avas.is_empty() {
            return Err(DnError::Der("an RDN without attributes"));
        }
        if !out.is_empty() {
            out.push(b',');
        }
        let mut first = true;
        while !avas.is_empty() {
            if !first {
                out.push(b'+');
            }
            first = false;
            let mut ava = Reader::new(avas.expect(SEQUENCE)?);
            let oid = dotted_oid(ava.expect(OID)?)?;
            let value = ava.any()?;
            ava.finish()?;
            attribute(&oid, value, &mut out)?;
        }
    }
    if out.is_empty() {
        return Err(DnError::Empty);
    }
    String::from_utf8(out).map_err(|_| DnError::NotUtf8 {
        attr: "an attribute".into(),
    })
}

/// Appends `NAME=value` for one attribute.
fn attribute(oid: &str, value: Tlv<'_>, out: &mut Vec<u8>) -> Result<(), DnError> {
    let entry = NAMES.iter().find(|(o, _, _)| *o == oid);
    let name = entry.and_then(|(_, n, _)| *n).unwrap_or(oid);
    let text = match entry {
        None => Text::Hex(value.whole),
        Some((_, _, expect)) => decode(*expect, value, name)?,
    };
    out.extend_from_slice(name.as_bytes());
    out.push(b'=');
    match text {
        Text::Hex(bytes) => out.extend_from_slice(hex(bytes).as_bytes()),
        Text::Decoded(bytes) => {
            if std::str::from_utf8(&bytes).is_err() {
                return Err(DnError::NotUtf8 { attr: name.into() });
            }
            escape(&bytes, out);
        }
    }
    Ok(())
}

/// What GnuTLS writes for a value.
enum Text<'a> {
    /// `#` and the hex of these bytes, not escaped (the whole DER of a value it does not read).
    Hex(&'a [u8]),
    /// Text to escape (for a DirectoryString it cannot print: `#` and the hex of the content,
    /// whose `#` the escaping then turns into `\#`).
    Decoded(Vec<u8>),
}

fn decode<'a>(expect: Expect, value: Tlv<'a>, attr: &str) -> Result<Text<'a>, DnError> {
    let nul_free = |text: Vec<u8>| {
        if text.contains(&0) {
            Text::Hex(value.whole)
        } else {
            Text::Decoded(text)
        }
    };
    match expect {
        Expect::Directory => {
            // GnuTLS refuses a DirectoryString whose DER length byte is 0 (of any tag).
            if value.whole.get(1) == Some(&0) {
                return Err(DnError::Refused {
                    attr: attr.into(),
                    why: "an empty DirectoryString",
                });
            }
            Ok(match value.tag {
                UTF8_STRING | PRINTABLE_STRING => nul_free(value.content.to_vec()),
                TELETEX_STRING if value.content.iter().all(|b| (0x20..0x7f).contains(b)) => {
                    nul_free(value.content.to_vec())
                }
                TELETEX_STRING | UNIVERSAL_STRING => Text::Decoded(hex(value.content).into()),
                BMP_STRING => match bmp_to_utf8(value.content) {
                    Some(text) => nul_free(text),
                    None => Text::Decoded(hex(value.content).into()),
                },
                _ => Text::Hex(value.whole),
            })
        }
        Expect::ChallengePassword => Ok(match value.tag {
            UTF8_STRING | PRINTABLE_STRING if !value.content.is_empty() => {
                nul_free(value.content.to_vec())
            }
            _ => Text::Hex(value.whole),
        }),
        Expect::Only(tag) if tag != value.tag || value.content.is_empty() => {
            Ok(Text::Hex(value.whole))
        }
        Expect::Only(BMP_STRING) => Ok(match bmp_to_utf8(value.content) {
            Some(text) => nul_free(text),
            None => Text::Decoded(hex(value.content).into()),
        }),
        // GnuTLS keeps an OCTET STRING's bytes as they are, and then fails the whole name on a
        // NUL among them.
        Expect::Only(OCTET_STRING) if value.content.contains(&0) => Err(DnError::Refused {
            attr: attr.into(),
            why: "a NUL byte in an OCTET STRING",
        }),
        Expect::Only(OCTET_STRING) => Ok(Text::Decoded(value.content.to_vec())),
        Expect::Only(_) => Ok(nul_free(value.content.to_vec())),
    }
}

/// A BMPString's content as GnuTLS converts it (`_gnutls_ucs2_to_utf8`): one trailing pair of
/// zero bytes dropped (when more remain), an odd last byte ignored, UTF-16BE decoded strictly
/// (surrogates must pair). `None`: it cannot be converted, and GnuTLS shows the hex instead.
fn bmp_to_utf8(content: &[u8]) -> Option<Vec<u8>> {
    let mut len = content.len();
    if len > 2 && content[len - 1] == 0 && content[len - 2] == 0 {
        len -= 2;
    }
    if len == 0 {
        return None;
    }
    let units = content[..len]
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
    let text: String = char::decode_utf16(units).collect::<Result<_, _>>().ok()?;
    Some(text.into_bytes())
}

/// RFC 4514 escaping as GnuTLS does it (`str_escape`).
fn escape(text: &[u8], out: &mut Vec<u8>) {
    let last = text.len().saturating_sub(1);
    for (i, &b) in text.iter().enumerate() {
        let special = matches!(b, b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';')
            || (i == 0 && (b == b'#' || b == b' '))
            || (i == last && b == b' ');
        if special {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// `#` and lowercase hex, as GnuTLS's `data2hex`.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(1 + 2 * bytes.len());
    s.push('#');
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// An OID's content in dotted form, as libtasn1 writes it; encodings it would read differently
/// from DER (a non-minimal arc, an unfinished last arc, an arc too large) are refused.
fn dotted_oid(content: &[u8]) -> Result<String, DnError> {
    if content.is_empty() {
        return Err(DnError::Der("an empty OID"));
    }
    let mut arcs: Vec<u64> = Vec::new();
    let mut value: u64 = 0;
    let mut starting = true;
    for &b in content {
        if starting && b == 0x80 {
            return Err(DnError::Der("an OID arc with a leading zero"));
        }
        if value > u64::MAX >> 7 {
            return Err(DnError::Der("an OID arc too large"));
        }
        value = (value << 7) | u64::from(b & 0x7f);
        starting = b & 0x80 == 0;
        if starting {
            // libtasn1 prints arcs as signed 64-bit numbers: larger ones come out negative.
            if value > i64::MAX as u64 {
                return Err(DnError::Der("an OID arc too large"));
            }
            arcs.push(value);
            value = 0;
        }
    }
    if !starting {
        return Err(DnError::Der("an unfinished OID arc"));
    }
    let (first, second) = match arcs[0] {
        v if v < 40 => (0, v),
        v if v < 80 => (1, v - 40),
        v => (2, v - 80),
    };
    let mut s = format!("{first}.{second}");
    for arc in &arcs[1..] {
        let _ = write!(s, ".{arc}");
    }
    if s.len() > MAX_OID_CHARS {
        return Err(DnError::Der("an OID too long"));
    }
    Ok(s)
}

/// One DER element: its tag, its content, and all its bytes.
#[derive(Debug, Clone, Copy)]
struct Tlv<'a> {
    tag: u8,
    content: &'a [u8],
    whole: &'a [u8],
}

/// Reads DER elements one after another; only single-byte tags and minimal definite lengths.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn finish(&self) -> Result<(), DnError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DnError::Der("bytes after the end of an element"))
        }
    }

    /// The content of the next element, which must have tag `tag`.
    fn expect(&mut self, tag: u8) -> Result<&'a [u8], DnError> {
        let tlv = self.any()?;
        if tlv.tag == tag {
            Ok(tlv.content)
        } else {
            Err(DnError::Der("an element of the wrong type"))
        }
    }

    fn any(&mut self) -> Result<Tlv<'a>, DnError> {
        let bytes = self.rest;
        let (&tag, after_tag) = bytes
            .split_first()
            .ok_or(DnError::Der("an element cut short"))?;
        if tag & 0x1f == 0x1f || tag == 0 {
            return Err(DnError::Der("a multi-byte or zero tag"));
        }
        let (&first, after_len) = after_tag
            .split_first()
            .ok_or(DnError::Der("an element cut short"))?;
        let (len, header) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || after_len.len() < n {
                return Err(DnError::Der("an indefinite or oversized length"));
            }
            let len = after_len[..n]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            if after_len[0] == 0 || len < 0x80 {
                return Err(DnError::Der("a non-minimal length"));
            }
            (len, 2 + n)
        };
        let end = header
            .checked_add(len)
            .filter(|&end| end <= bytes.len())
            .ok_or(DnError::Der("an element longer than what holds it"))?;
        self.rest = &bytes[end..];
        Ok(Tlv {
            tag,
            content: &bytes[header..end],
            whole: &bytes[..end],
        })
    }
}

#[cfg(test)]
mod tests {
    //! Every expected string here was printed by GnuTLS 3.7.9 (Debian 12's `libgnutls30`) for
    //! the same DER: `gnutls_x509_rdn_get2(name, &out, GNUTLS_X509_DN_FLAG_COMPAT)`, which is
    //! what `gnutls_x509_crt_get_dn` runs on a certificate's subject (checked to agree on whole
    //! certificates made with `openssl req -x509 -subj ...`).

    use super::*;

    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        match content.len() {
            n if n < 0x80 => v.push(n as u8),
            n if n < 0x100 => v.extend([0x81, n as u8]),
            n => v.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        v.extend_from_slice(content);
        v
    }

    fn ava(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        tlv(SEQUENCE, &[tlv(OID, oid), tlv(tag, value)].concat())
    }

    fn name(rdns: &[&[Vec<u8>]]) -> Vec<u8> {
        let sets: Vec<u8> = rdns.iter().flat_map(|r| tlv(SET, &r.concat())).collect();
        tlv(SEQUENCE, &sets)
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const C: &[u8] = &[0x55, 0x04, 0x06];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    const OU: &[u8] = &[0x55, 0x04, 0x0b];
    const UID: &[u8] = &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01];
    const DC: &[u8] = &[0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19];
    const EMAIL: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01];
    const LOCAL_KEY_ID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x15];
    const UNKNOWN: &[u8] = &[0x2a, 0x03, 0x04, 0x05];

    fn dn(rdns: &[&[Vec<u8>]]) -> Result<String, DnError> {
        qemu_authz_dn(&name(rdns))
    }

    #[test]
    fn rdns_keep_the_certificates_order_joined_by_commas_without_spaces() {
        let got = dn(&[
            &[ava(C, PRINTABLE_STRING, b"US")],
            &[ava(O, UTF8_STRING, b"Acme")],
            &[ava(CN, UTF8_STRING, b"host-a")],
        ]);

        assert_eq!(got.as_deref(), Ok("C=US,O=Acme,CN=host-a"));
    }

    #[test]
    fn a_multi_valued_rdn_joins_its_attributes_with_plus_in_encoded_order() {
        let got = dn(&[
            &[ava(UID, UTF8_STRING, b"b"), ava(CN, UTF8_STRING, b"a")],
            &[ava(O, UTF8_STRING, b"o")],
        ]);

        assert_eq!(got.as_deref(), Ok("UID=b+CN=a,O=o"));
    }

    #[test]
    fn specials_are_escaped_anywhere_and_hash_and_spaces_at_the_ends() {
        let specials = dn(&[&[ava(CN, UTF8_STRING, b"a,b+c\"d\\e<f>g;h=i#j")]]);
        let ends = dn(&[
            &[ava(CN, UTF8_STRING, b"#x")],
            &[ava(O, UTF8_STRING, b"  x  ")],
            &[ava(OU, UTF8_STRING, b" ")],
        ]);

        assert_eq!(specials.as_deref(), Ok(r#"CN=a\,b\+c\"d\\e\<f\>g\;h=i#j"#));
        assert_eq!(ends.as_deref(), Ok(r"CN=\#x,O=\  x \ ,OU=\ "));
    }

    #[test]
    fn utf8_and_control_characters_pass_unescaped() {
        let got = dn(&[
            &[ava(CN, UTF8_STRING, "hôte-ü".as_bytes())],
            &[ava(O, UTF8_STRING, b"a\nb")],
        ]);

        assert_eq!(got.as_deref(), Ok("CN=hôte-ü,O=a\nb"));
    }

    #[test]
    fn a_country_that_is_not_a_printable_string_is_written_as_hex_der() {
        let got = dn(&[
            &[ava(C, UTF8_STRING, b"US")],
            &[ava(DC, IA5_STRING, b"example")],
            &[ava(DC, UTF8_STRING, b"com")],
            &[ava(CN, IA5_STRING, b"abc")],
        ]);

        assert_eq!(
            got.as_deref(),
            Ok("C=#0c025553,DC=example,DC=#0c03636f6d,CN=#1603616263")
        );
    }

    #[test]
    fn unknown_attributes_are_their_oid_and_hex_der() {
        let got = dn(&[
            &[ava(UNKNOWN, UTF8_STRING, b"abc")],
            &[ava(EMAIL, IA5_STRING, b"a@b")],
        ]);

        assert_eq!(got.as_deref(), Ok("1.2.3.4.5=#0c03616263,EMAIL=a@b"));
    }

    #[test]
    fn directory_strings_of_other_types_follow_gnutls() {
        let bmp = "hé日"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect::<Vec<u8>>();
        let cases: [(u8, &[u8], &str); 8] = [
            (TELETEX_STRING, b"abc", "CN=abc"),
            (TELETEX_STRING, b"caf\xe9", r"CN=\#636166e9"),
            (BMP_STRING, &bmp, "CN=hé日"),
            (BMP_STRING, b"\x00a\x00", "CN=a"),
            (BMP_STRING, b"\xd8\x00\x00a", r"CN=\#d8000061"),
            (BMP_STRING, b"\x00\x00", "CN=#1e020000"),
            (UNIVERSAL_STRING, b"\x00\x00\x00a", r"CN=\#00000061"),
            (UTF8_STRING, b"a\x00b", "CN=#0c03610062"),
        ];
        for (tag, value, want) in cases {
            assert_eq!(
                dn(&[&[ava(CN, tag, value)]]).as_deref(),
                Ok(want),
                "{value:?}"
            );
        }
    }

    #[test]
    fn what_gnutls_or_qmp_cannot_carry_is_refused() {
        assert_eq!(qemu_authz_dn(&tlv(SEQUENCE, &[])), Err(DnError::Empty));
        assert!(matches!(
            dn(&[&[ava(CN, UTF8_STRING, b"")]]),
            Err(DnError::Refused { .. })
        ));
        assert!(matches!(
            dn(&[&[ava(LOCAL_KEY_ID, OCTET_STRING, b"a\x00")]]),
            Err(DnError::Refused { .. })
        ));
        assert!(matches!(
            dn(&[&[ava(CN, UTF8_STRING, b"a\xffb")]]),
            Err(DnError::NotUtf8 { .. })
        ));
        assert!(matches!(
            dn(&[&[ava(&[0x2a, 0x80, 0x01], UTF8_STRING, b"a")]]),
            Err(DnError::Der(_))
        ));
    }

    #[test]
    fn cloudstack_agent_certificates_read_cn_first() {
        // keytool -dname cn=FQDN,ou=cloudstack,o=cloudstack,c=cloudstack, re-issued by the
        // management server through X500Principal: CN first, all PrintableStrings.
        let got = dn(&[
            &[ava(CN, PRINTABLE_STRING, b"kvm1.cloud.example")],
            &[ava(OU, PRINTABLE_STRING, b"cloudstack")],
            &[ava(O, PRINTABLE_STRING, b"cloudstack")],
            &[ava(C, PRINTABLE_STRING, b"cloudstack")],
        ]);

        assert_eq!(
            got.as_deref(),
            Ok("CN=kvm1.cloud.example,OU=cloudstack,O=cloudstack,C=cloudstack")
        );
    }
}
