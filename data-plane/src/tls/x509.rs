//! Just enough DER to read a certificate's serial number and validity period (RFC 5280 section
//! 4.1), so that an expired certificate is refused at load. rustls checks signatures and keys;
//! this walks the fixed prefix of `TBSCertificate` and nothing else, which costs no dependency.
//! Anything that is not strict DER in that prefix is an error, never a panic.

/// What is read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, hex.
    pub serial: String,
    pub not_before: Time,
    pub not_after: Time,
}

/// A validity bound: seconds since the Unix epoch and its UTC text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Time {
    pub unix: i64,
    pub text: String,
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT Version`, present in v2 and v3 certificates.
const VERSION_TAG: u8 = 0xa0;

/// Reads the serial number and validity period of a DER certificate.
pub fn parse(der: &[u8]) -> Result<CertInfo, &'static str> {
    let (tag, cert, _) = tlv(der)?;
    if tag != SEQUENCE {
        return Err("not an X.509 certificate");
    }
    let (tag, tbs, _) = tlv(cert)?;
    if tag != SEQUENCE {
        return Err("not an X.509 certificate");
    }
    let mut rest = tbs;
    if rest.first() == Some(&VERSION_TAG) {
        rest = tlv(rest)?.2;
    }
    let (tag, serial, rest) = tlv(rest)?;
    if tag != INTEGER {
        return Err("certificate serial number is missing");
    }
    let (_signature_algorithm, rest) = expect(rest, SEQUENCE)?;
    let (_issuer, rest) = expect(rest, SEQUENCE)?;
    let (validity, _) = expect(rest, SEQUENCE)?;
    let (tag, before, rest) = tlv(validity)?;
    let not_before = time(tag, before)?;
    let (tag, after, _) = tlv(rest)?;
    let not_after = time(tag, after)?;
    // Without the sign byte DER adds before a high first bit, as tools print serials.
    let serial = match serial {
        [0, rest @ ..] if !rest.is_empty() => rest,
        all => all,
    };
    let serial = serial.iter().map(|b| format!("{b:02x}")).collect();
    Ok(CertInfo {
        serial,
        not_before,
        not_after,
    })
}

fn expect(input: &[u8], want: u8) -> Result<(&[u8], &[u8]), &'static str> {
    match tlv(input)? {
        (tag, content, rest) if tag == want => Ok((content, rest)),
        _ => Err("certificate structure is not as X.509 defines it"),
    }
}

/// One tag-length-value: the tag, the content and what follows.
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
    const TRUNCATED: &str = "certificate DER is truncated";
    let (&tag, rest) = input.split_first().ok_or(TRUNCATED)?;
    if tag & 0x1f == 0x1f {
        return Err("certificate DER uses a multi-byte tag");
    }
    let (&first, mut rest) = rest.split_first().ok_or(TRUNCATED)?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        // Long form: the low bits count the length bytes; 0x80 (indefinite) is not DER.
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return Err("certificate DER has an unsupported length");
        }
        if rest.len() < n {
            return Err(TRUNCATED);
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if rest.len() < len {
        return Err(TRUNCATED);
    }
    let (content, after) = rest.split_at(len);
    Ok((tag, content, after))
}

/// `UTCTime` (`YYMMDDHHMMSSZ`, years 1950-2049) or `GeneralizedTime` (`YYYYMMDDHHMMSSZ`), the
/// two forms RFC 5280 allows.
fn time(tag: u8, text: &[u8]) -> Result<Time, &'static str> {
    const BAD: &str = "certificate validity time is malformed";
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = i64::from(two_digits(text, 0).ok_or(BAD)?);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 15) => {
            let hi = i64::from(two_digits(text, 0).ok_or(BAD)?);
            let lo = i64::from(two_digits(text, 2).ok_or(BAD)?);
            (hi * 100 + lo, &text[4..])
        }
        _ => return Err(BAD),
    };
    let field = |i: usize| two_digits(rest, i).ok_or(BAD);
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if rest.get(10) != Some(&b'Z')
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(BAD);
    }
    // The fields are two or four digits each: they fit.
    let calendar_month = time::Month::try_from(month as u8).map_err(|_| BAD)?;
    let date =
        time::Date::from_calendar_date(year as i32, calendar_month, day as u8).map_err(|_| BAD)?;
    let at = time::Time::from_hms(hour as u8, minute as u8, second as u8).map_err(|_| BAD)?;
    let unix = time::PrimitiveDateTime::new(date, at)
        .assume_utc()
        .unix_timestamp();
    Ok(Time {
        unix,
        text: format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z"),
    })
}

fn two_digits(s: &[u8], at: usize) -> Option<u32> {
    match s.get(at..at + 2)? {
        [a @ b'0'..=b'9', b @ b'0'..=b'9'] => Some(u32::from(a - b'0') * 10 + u32::from(b - b'0')),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validity_times_map_to_unix_seconds() {
        let unix = |text: &[u8]| time(GENERALIZED_TIME, text).map(|t| t.unix);
        assert_eq!(unix(b"19700101000000Z"), Ok(0));
        assert_eq!(unix(b"20000301000000Z"), Ok(11_017 * 86_400));
        assert_eq!(unix(b"19691231000000Z"), Ok(-86_400));
        assert_eq!(unix(b"20240229000000Z"), Ok(19_782 * 86_400));
        // A day the month does not have.
        assert!(unix(b"20230229000000Z").is_err());
        assert!(unix(b"20240431000000Z").is_err());
    }

    #[test]
    fn both_time_forms_parse() {
        let t = time(UTC_TIME, b"240229123456Z").unwrap();
        assert_eq!(t.unix, 19_782 * 86_400 + 12 * 3600 + 34 * 60 + 56);
        assert_eq!(t.text, "2024-02-29T12:34:56Z");
        assert_eq!(
            time(UTC_TIME, b"500101000000Z").unwrap().text,
            "1950-01-01T00:00:00Z"
        );
        let g = time(GENERALIZED_TIME, b"20500101000000Z").unwrap();
        assert_eq!(g.text, "2050-01-01T00:00:00Z");
        for bad in [
            &b"2402291234Z"[..],
            b"241329123456Z",
            b"240229123456+",
            b"24022912345aZ",
            b"240229243456Z",
        ] {
            assert!(time(UTC_TIME, bad).is_err(), "{bad:?}");
        }
        assert!(time(0x04, b"240229123456Z").is_err());
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert!(parse(&[]).is_err());
        assert!(parse(&[0x30]).is_err());
        assert!(parse(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse(&[0x30, 0x80, 0x00, 0x00]).is_err());
        assert!(parse(&[0x30, 0x02, 0x30, 0x00]).is_err());
        assert!(parse(b"hello world").is_err());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse(&bytes);
            let mut framed = vec![0x30, 0x81, bytes.len().min(255) as u8];
            framed.extend_from_slice(&bytes);
            let _ = parse(&framed);
        }
    }
}
