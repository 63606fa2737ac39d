//! Durations as settings give them: a whole number of milliseconds (`250`, the unit the `_ms`
//! names promise), or a number with a unit (`"250ms"`, `"10s"`, `"1.5s"`, `"5m"`, `"1h"`). Every
//! `_ms` field of a configuration file, environment variable or flag accepts both.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};

/// Milliseconds in `text`: digits alone are milliseconds; otherwise a non-negative number followed
/// by `ms`, `s`, `m` or `h`. The error says what was expected.
pub fn parse_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "{text:?} is not a duration: milliseconds (250) or a number with a unit \
             (250ms, 10s, 1.5s, 5m, 1h)"
        )
    };
    if let Ok(ms) = t.parse::<u64>() {
        return Ok(ms);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (number, unit) = t.split_at(split);
    let per_unit = match unit.trim() {
        "ms" => 1.0,
        "s" => 1_000.0,
        "m" | "min" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return Err(bad()),
    };
    let n: f64 = number.parse().map_err(|_| bad())?;
    let ms = (n * per_unit).round();
    // Beyond 2^53 a float no longer holds every whole millisecond; no setting needs that.
    if !(0.0..=9_007_199_254_740_992.0).contains(&ms) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(ms as u64)
}

/// `deserialize_with` for a `_ms` field: an integer or a duration string, in range of `T`.
pub fn millis<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    let ms = d.deserialize_any(Millis)?;
    T::try_from(ms).map_err(|_| de::Error::custom(format!("{ms} ms is out of range")))
}

/// `deserialize_with` for an optional `_ms` field (absent or null: `None`).
pub fn opt_millis<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Opt<T>(std::marker::PhantomData<T>);
    impl<'de, T: TryFrom<u64>> Visitor<'de> for Opt<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            Millis.expecting(f)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            millis(d).map(Some)
        }
    }
    d.deserialize_option(Opt(std::marker::PhantomData))
}

struct Millis;

impl Visitor<'_> for Millis {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("milliseconds, or a duration such as \"250ms\", \"10s\" or \"5m\"")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative: a duration is not")))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= 9_007_199_254_740_992.0 {
            Ok(v as u64)
        } else {
            Err(E::custom(format!(
                "{v} is not a whole number of milliseconds"
            )))
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        parse_ms(v).map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn numbers_are_milliseconds_and_units_scale() {
        for (text, ms) in [
            ("250", 250),
            ("250ms", 250),
            ("10s", 10_000),
            ("1.5s", 1_500),
            (" 5m ", 300_000),
            ("2min", 120_000),
            ("1h", 3_600_000),
            ("0s", 0),
        ] {
            assert_eq!(parse_ms(text), Ok(ms), "{text}");
        }
        for bad in [
            "",
            "s",
            "10 seconds",
            "-5s",
            "1.2.3s",
            "10d",
            "ms10",
            "1e3s",
        ] {
            let e = parse_ms(bad).unwrap_err();
            assert!(e.contains("is not a duration"), "{bad}: {e}");
        }
        assert!(
            parse_ms("99999999999999h")
                .unwrap_err()
                .contains("out of range")
        );
    }

    #[derive(Debug, serde::Deserialize)]
    struct Both {
        #[serde(deserialize_with = "millis")]
        a: u32,
        #[serde(default, deserialize_with = "opt_millis")]
        b: Option<u32>,
    }

    #[test]
    fn fields_take_integers_or_strings_and_check_their_range() {
        let v: Both = toml::from_str("a = \"2s\"\nb = 7\n").unwrap();
        assert_eq!((v.a, v.b), (2_000, Some(7)));
        let v: Both = toml::from_str("a = 5").unwrap();
        assert_eq!((v.a, v.b), (5, None));
        let e = toml::from_str::<Both>("a = \"2000h\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of range"), "{e}");
        let e = toml::from_str::<Both>("a = -1").unwrap_err().to_string();
        assert!(e.contains("negative"), "{e}");
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panic(text in "\\PC{0,12}") {
            let _ = parse_ms(&text);
        }

        #[test]
        fn whole_seconds_are_a_thousand_milliseconds(s in 0u64..10_000_000) {
            prop_assert_eq!(parse_ms(&format!("{s}s")), Ok(s * 1000));
            prop_assert_eq!(parse_ms(&s.to_string()), Ok(s));
        }
    }
}
