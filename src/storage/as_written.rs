//! Whether the JSON a client wrote for a column and the JSON Postgres renders for it denote the
//! same value (a timestamp in another notation, `2` and `2.00`, a jsonb object with its keys
//! reordered), so that the hub can hand values back as they were written while Postgres holds
//! them unchanged. Pure code: when in doubt the answer is "not the same", which lets Postgres's
//! rendering stand.

use chrono::{NaiveDate, NaiveDateTime, NaiveTime, TimeDelta};
use protocol::Object;
use serde_json::Value;

/// Whether `stored` (Postgres's JSON rendering of a value of a column of type `sql_type`, the
/// `format_type` text such as `numeric(10,2)` or `timestamp(3) with time zone`) and `written`
/// (the JSON a client wrote for it) denote the same value. Types it does not know compare as
/// plain JSON.
pub fn same_value(sql_type: &str, stored: &Value, written: &Value) -> bool {
    if stored == written {
        return true;
    }
    if stored.is_null() || written.is_null() {
        return false;
    }
    let base = base_type(sql_type);
    match base.strip_suffix("[]") {
        Some(element) => same_array(element, stored, written),
        None => same_scalar(ColumnKind::of(&base), stored, written),
    }
}

/// For each field of `written` that `image` holds as the same value (see [`same_value`]),
/// `image` takes the written JSON; `column_type` gives a column's `format_type` (`None`: a
/// column it does not know, compared as plain JSON).
pub fn keep_as_written<'t>(image: &mut Object, written: &Object, column_type: impl Fn(&str) -> Option<&'t str>) {
    for (field, value) in written {
        let Some(stored) = image.get_mut(field) else { continue };
        if stored != value && same_value(column_type(field).unwrap_or(""), stored, value) {
            *stored = value.clone();
        }
    }
}

/// Whether Postgres stores `value` in a column of type `sql_type` (its `format_type`) exactly as
/// written, or refuses it, so that its JSON rendering of what it stored is `value` itself:
/// integers in integer columns, strings in unbounded text columns, booleans, and null. Other
/// pairs may be rounded, padded, truncated (a `varchar(n)` drops trailing spaces past `n`),
/// converted or normalized, and the merge then takes the stored row back from Postgres.
pub fn stored_as_written(sql_type: &str, value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(_) => sql_type == "boolean",
        Value::Number(n) => (n.is_i64() || n.is_u64()) && matches!(sql_type, "smallint" | "integer" | "bigint"),
        Value::String(_) => matches!(sql_type, "text" | "character varying"),
        Value::Array(_) | Value::Object(_) => false,
    }
}

/// `sql_type` without type modifiers: `numeric(10,2)` → `numeric`, `timestamp(3) with time
/// zone` → `timestamp with time zone`, `character varying(40)[]` → `character varying[]`.
pub fn base_type(sql_type: &str) -> String {
    let mut depth = 0usize;
    let mut base = String::with_capacity(sql_type.len());
    for c in sql_type.trim().chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            c if depth == 0 => base.push(c),
            _ => {}
        }
    }
    base
}

/// How values of a column type compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColumnKind {
    /// `timestamp with time zone`: the same instant.
    Instant,
    /// `timestamp without time zone`: the same wall-clock date and time; an offset written
    /// with it is ignored, as Postgres ignores it.
    LocalDateTime,
    /// `date`: the same day; a date-time written for it counts by its date, as Postgres reads it.
    Date,
    /// `time without time zone`: the same time of day (an offset written is ignored).
    Time,
    /// `time with time zone`: the same time of day at the same offset.
    TimeWithZone,
    /// Integers, `numeric`, `real`, `double precision`: the same number (`1.5` and `1.50`, a
    /// number and its digits in a string).
    Number,
    /// `json`, `jsonb`: the same structure, numbers by value, keys in any order.
    Json,
    Boolean,
    /// `character(n)`: trailing spaces do not count.
    PaddedText,
    /// `uuid`: case and notation do not count.
    Uuid,
    /// Anything else: plain JSON equality.
    Other,
}

impl ColumnKind {
    fn of(base_type: &str) -> ColumnKind {
        match base_type {
            "timestamp with time zone" => ColumnKind::Instant,
            "timestamp without time zone" => ColumnKind::LocalDateTime,
            "date" => ColumnKind::Date,
            "time without time zone" => ColumnKind::Time,
            "time with time zone" => ColumnKind::TimeWithZone,
            "smallint" | "integer" | "bigint" | "numeric" | "real" | "double precision" => ColumnKind::Number,
            "json" | "jsonb" => ColumnKind::Json,
            "boolean" => ColumnKind::Boolean,
            "character" => ColumnKind::PaddedText,
            "uuid" => ColumnKind::Uuid,
            _ => ColumnKind::Other,
        }
    }
}

fn same_array(element_type: &str, stored: &Value, written: &Value) -> bool {
    let (Value::Array(stored), Value::Array(written)) = (stored, written) else { return false };
    stored.len() == written.len() && stored.iter().zip(written).all(|(s, w)| match (s, w) {
        // A multidimensional array: the same element type one level down.
        (Value::Array(_), Value::Array(_)) => same_array(element_type, s, w),
        _ => same_value(element_type, s, w),
    })
}

fn same_scalar(kind: ColumnKind, stored: &Value, written: &Value) -> bool {
    match kind {
        ColumnKind::Json => same_json(stored, written),
        ColumnKind::Number => both(decimal, stored, written),
        ColumnKind::Boolean => both(boolean, stored, written),
        ColumnKind::Other => false, // plain JSON equality, already checked
        _ => match (stored, written) {
            (Value::String(stored), Value::String(written)) => same_text(kind, stored, written),
            _ => false,
        },
    }
}

/// Whether `read` reads both values and finds them equal.
fn both<T: PartialEq>(read: impl Fn(&Value) -> Option<T>, a: &Value, b: &Value) -> bool {
    matches!((read(a), read(b)), (Some(a), Some(b)) if a == b)
}

fn same_text(kind: ColumnKind, stored: &str, written: &str) -> bool {
    match kind {
        ColumnKind::Instant => read_equal(stored, written, |t| DateTimeText::parse(t)?.instant()),
        ColumnKind::LocalDateTime => read_equal(stored, written, |t| Some(DateTimeText::parse(t)?.local)),
        ColumnKind::Date => read_equal(stored, written, parse_date_or_date_time),
        ColumnKind::Time => read_equal(stored, written, |t| Some(TimeText::parse(t)?.time)),
        ColumnKind::TimeWithZone => read_equal(stored, written, |t| {
            let time = TimeText::parse(t)?;
            Some((time.time, time.offset_secs?))
        }),
        ColumnKind::PaddedText => stored.trim_end_matches(' ') == written.trim_end_matches(' '),
        ColumnKind::Uuid => read_equal(stored, written, uuid_hex),
        _ => false,
    }
}

/// Whether `read` reads both texts and finds them equal.
fn read_equal<T: PartialEq>(a: &str, b: &str, read: impl Fn(&str) -> Option<T>) -> bool {
    matches!((read(a), read(b)), (Some(a), Some(b)) if a == b)
}

/// Structural equality of JSON values: numbers by value, objects whatever their key order.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => both(decimal, a, b),
        (Value::Array(a), Value::Array(b)) => a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_json(a, b)),
        (Value::Object(a), Value::Object(b)) => a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| same_json(v, w))),
        _ => a == b,
    }
}

// ---------------------------------------------------------------------------------------------
// Numbers
// ---------------------------------------------------------------------------------------------

/// A number by value: `0.digits × 10^exponent`, digits without leading or trailing zeros
/// (none for zero), or one of the specials Postgres's numeric and float types have.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Decimal {
    Finite { negative: bool, digits: String, exponent: i64 },
    NaN,
    Infinity { negative: bool },
}

/// A JSON number, or a string of digits as Postgres reads them into a numeric column.
fn decimal(value: &Value) -> Option<Decimal> {
    match value {
        Value::Number(n) => parse_decimal(&n.to_string()),
        Value::String(s) => parse_decimal(s.trim()),
        _ => None,
    }
}

fn parse_decimal(text: &str) -> Option<Decimal> {
    let (negative, unsigned) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    match unsigned.to_ascii_lowercase().as_str() {
        "nan" if unsigned.len() == text.len() => return Some(Decimal::NaN),
        "infinity" | "inf" => return Some(Decimal::Infinity { negative }),
        _ => {}
    }
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], unsigned[at + 1..].parse::<i64>().ok()?),
        None => (unsigned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.len() + fraction.len() == 0 || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let digits = format!("{whole}{fraction}");
    let leading = digits.len() - digits.trim_start_matches('0').len();
    let significant = digits.trim_matches('0');
    if significant.is_empty() {
        return Some(Decimal::Finite { negative: false, digits: String::new(), exponent: 0 });
    }
    let exponent = exponent.checked_add(whole.len() as i64)?.checked_sub(leading as i64)?;
    Some(Decimal::Finite { negative, digits: significant.to_owned(), exponent })
}

// ---------------------------------------------------------------------------------------------
// Booleans and uuids
// ---------------------------------------------------------------------------------------------

/// A JSON boolean, or a string Postgres reads as one (`t`, `yes`, `on`, `1`, ... and their
/// unique prefixes, in any case, spaces around).
fn boolean(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(s) => parse_pg_bool(s),
        _ => None,
    }
}

fn parse_pg_bool(text: &str) -> Option<bool> {
    let word = text.trim().to_ascii_lowercase();
    let prefix_of = |full: &str, min: usize| word.len() >= min && full.starts_with(word.as_str());
    if prefix_of("true", 1) || prefix_of("yes", 1) || prefix_of("on", 2) || word == "1" {
        Some(true)
    } else if prefix_of("false", 1) || prefix_of("no", 1) || prefix_of("off", 2) || word == "0" {
        Some(false)
    } else {
        None
    }
}

/// A uuid's 32 hex digits in lower case, from any notation Postgres accepts (hyphens or none,
/// braces around, either case).
fn uuid_hex(text: &str) -> Option<String> {
    let text = text.trim();
    let inner = match text.strip_prefix('{') {
        Some(rest) => rest.strip_suffix('}')?,
        None => text,
    };
    let hex: String = inner.chars().filter(|c| *c != '-').map(|c| c.to_ascii_lowercase()).collect();
    (hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

// ---------------------------------------------------------------------------------------------
// Dates and times
// ---------------------------------------------------------------------------------------------

/// A date-time as ISO 8601 / RFC 3339 writes it and Postgres renders it: `YYYY-MM-DD`, `T` or a
/// space, a time, an optional offset (`Z`, `+HH`, `+HHMM`, `+HH:MM`, `+HH:MM:SS`). Years of
/// other than four digits and BC dates are not read (they compare as "not the same").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DateTimeText {
    local: NaiveDateTime,
    offset_secs: Option<i32>,
}

impl DateTimeText {
    fn parse(text: &str) -> Option<DateTimeText> {
        let text = text.trim();
        let date = parse_date(text.get(..10)?)?;
        let rest = text.get(10..)?.strip_prefix(['T', 't', ' '])?;
        let time = TimeText::parse(rest)?;
        Some(DateTimeText { local: date.and_time(time.time), offset_secs: time.offset_secs })
    }

    /// The instant in UTC; `None` without an offset (Postgres would read it in its session's
    /// time zone, which is not known here).
    fn instant(&self) -> Option<NaiveDateTime> {
        self.local.checked_sub_signed(TimeDelta::seconds(i64::from(self.offset_secs?)))
    }
}

/// A time of day with an optional offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TimeText {
    time: NaiveTime,
    offset_secs: Option<i32>,
}

impl TimeText {
    fn parse(text: &str) -> Option<TimeText> {
        let split = text.find(['Z', 'z', '+', '-']).unwrap_or(text.len());
        let time = parse_time(&text[..split])?;
        let offset_secs = if split == text.len() { None } else { Some(parse_offset(&text[split..])?) };
        Some(TimeText { time, offset_secs })
    }
}

/// Exactly `YYYY-MM-DD`, a real date.
fn parse_date(text: &str) -> Option<NaiveDate> {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    NaiveDate::from_ymd_opt(digits(&b[0..4])? as i32, digits(&b[5..7])?, digits(&b[8..10])?)
}

/// A date, or the date of a date-time (its time and offset ignored, as Postgres's `date` input
/// ignores them).
fn parse_date_or_date_time(text: &str) -> Option<NaiveDate> {
    let text = text.trim();
    match text.len() {
        10 => parse_date(text),
        _ => Some(DateTimeText::parse(text)?.local.date()),
    }
}

/// `HH:MM`, `HH:MM:SS` or `HH:MM:SS.fraction` (at most nanoseconds).
fn parse_time(text: &str) -> Option<NaiveTime> {
    let b = text.as_bytes();
    if b.len() < 5 || b[2] != b':' {
        return None;
    }
    let (hour, minute) = (digits(&b[0..2])?, digits(&b[3..5])?);
    let (second, nanos) = match &b[5..] {
        [] => (0, 0),
        [b':', s1, s2, rest @ ..] => (digits(&[*s1, *s2])?, fraction_nanos(rest)?),
        _ => return None,
    };
    NaiveTime::from_hms_nano_opt(hour, minute, second, nanos).filter(|_| second < 60)
}

/// `.digits` (at most nine) as nanoseconds; an empty fraction is zero.
fn fraction_nanos(text: &[u8]) -> Option<u32> {
    let Some(fraction) = text.strip_prefix(b".") else {
        return text.is_empty().then_some(0);
    };
    if fraction.is_empty() || fraction.len() > 9 {
        return None;
    }
    Some(digits(fraction)? * 10u32.pow(9 - fraction.len() as u32))
}

/// `Z`, or a sign with `HH`, `HHMM`, `HH:MM` or `HH:MM:SS`, as seconds east of UTC.
fn parse_offset(text: &str) -> Option<i32> {
    let b = text.as_bytes();
    let sign = match b.first()? {
        b'Z' | b'z' if b.len() == 1 => return Some(0),
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (h, m, s) = match &b[1..] {
        [h1, h2] => ([*h1, *h2], [b'0'; 2], [b'0'; 2]),
        [h1, h2, m1, m2] | [h1, h2, b':', m1, m2] => ([*h1, *h2], [*m1, *m2], [b'0'; 2]),
        [h1, h2, b':', m1, m2, b':', s1, s2] => ([*h1, *h2], [*m1, *m2], [*s1, *s2]),
        _ => return None,
    };
    let (h, m, s) = (digits(&h)?, digits(&m)?, digits(&s)?);
    (h <= 15 && m < 60 && s < 60).then(|| sign * (h * 3600 + m * 60 + s) as i32)
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || b.len() > 9 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0, |n, d| n * 10 + u32::from(d - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const TZ: &str = "timestamp with time zone";

    #[test]
    fn stored_as_written_only_where_postgres_keeps_the_json_as_it_is() {
        for (ty, value) in [("integer", json!(5)), ("bigint", json!(-7)), ("smallint", json!(70000)), ("text", json!("a ")), ("character varying", json!("x")), ("boolean", json!(true)), ("numeric(6,2)", json!(null))] {
            assert!(stored_as_written(ty, &value), "{ty} {value}");
        }
        // Converted, rounded, padded, trimmed or normalized.
        for (ty, value) in [("integer", json!(5.0)), ("integer", json!("5")), ("bigint", json!(1e3)), ("numeric", json!(2)), ("character varying(5)", json!("abc  ")), ("character(3)", json!("ab")), ("text", json!(1)), ("boolean", json!("yes")), ("jsonb", json!({"a": 1})), ("uuid", json!("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11")), ("text[]", json!(["x"])), ("timestamp with time zone", json!("2026-01-01T10:00:00Z")), ("public.short_text", json!("x"))] {
            assert!(!stored_as_written(ty, &value), "{ty} {value}");
        }
    }

    #[test]
    fn timestamps_with_time_zone_compare_as_instants() {
        let js = json!("2026-01-01T10:00:00.000Z");
        assert!(same_value(TZ, &json!("2026-01-01T10:00:00+00:00"), &js));
        assert!(same_value("timestamp(3) with time zone", &json!("2026-01-01T15:30:00+05:30"), &js));
        assert!(same_value(TZ, &json!("2026-01-01T10:00:00.5+00:00"), &json!("2026-01-01 10:00:00.500Z")));
        assert!(same_value(TZ, &json!("1800-01-01T15:53:28+05:53:28"), &json!("1800-01-01T10:00:00Z")));
        assert!(same_value(TZ, &json!("2026-01-01T10:00:00+02"), &json!("2026-01-01T08:00:00+0000")));
        // Another instant, a rounded fraction, a value without an offset, something else.
        assert!(!same_value(TZ, &json!("2026-01-01T10:00:00+00:00"), &json!("2026-01-01T10:00:00.001Z")));
        assert!(!same_value(TZ, &json!("2026-01-01T10:00:00.123457+00:00"), &json!("2026-01-01T10:00:00.1234567Z")));
        assert!(!same_value(TZ, &json!("2026-01-01T10:00:00+00:00"), &json!("2026-01-01T10:00:00")));
        assert!(!same_value(TZ, &json!("2026-01-01T10:00:00+00:00"), &json!(1767261600000u64)));
        assert!(!same_value(TZ, &json!("20000-01-01T10:00:00+00:00"), &json!("+020000-01-01T10:00:00.000Z")));
        assert!(same_value(TZ, &json!("infinity"), &json!("infinity")));
    }

    #[test]
    fn other_dates_and_times_compare_as_postgres_reads_them() {
        let local = "timestamp without time zone";
        assert!(same_value(local, &json!("2026-01-01T10:00:00"), &json!("2026-01-01T10:00:00.000Z")));
        assert!(same_value(local, &json!("2026-01-01T10:00:00"), &json!("2026-01-01 10:00")));
        assert!(!same_value(local, &json!("2026-01-01T10:00:00"), &json!("2026-01-01T11:00:00+01:00")));
        assert!(same_value("date", &json!("2026-01-01"), &json!("2026-01-01T23:30:00-05:00")));
        assert!(!same_value("date", &json!("2026-01-01"), &json!("2026-01-02")));
        assert!(!same_value("date", &json!("2026-02-30"), &json!("2026-02-30T00:00:00")), "not a date");
        assert!(same_value("time without time zone", &json!("10:00:00"), &json!("10:00")));
        assert!(same_value("time(3) without time zone", &json!("10:00:00.5"), &json!("10:00:00.500")));
        assert!(same_value("time without time zone", &json!("10:00:00.5"), &json!("10:00:00.5+03")));
        assert!(!same_value("time without time zone", &json!("10:00:00"), &json!("10:00:01")));
        assert!(same_value("time with time zone", &json!("10:00:00+02"), &json!("10:00+02:00")));
        assert!(!same_value("time with time zone", &json!("10:00:00+02"), &json!("08:00:00Z")));
        assert!(!same_value("time with time zone", &json!("10:00:00+02"), &json!("10:00:00")));
    }

    #[test]
    fn numbers_compare_by_value() {
        for ty in ["numeric(10,2)", "integer", "bigint", "real", "double precision", "smallint"] {
            assert!(same_value(ty, &json!(2.0), &json!(2)), "{ty}");
            assert!(same_value(ty, &json!(1.5), &json!("1.50")), "{ty}");
            assert!(!same_value(ty, &json!(1.5), &json!(1.25)), "{ty}");
            assert!(!same_value(ty, &json!(1.5), &json!(true)), "{ty}");
        }
        assert!(same_value("numeric", &json!(1e20), &json!("100000000000000000000")));
        assert!(same_value("numeric", &json!(0), &json!("-0.000")));
        assert!(same_value("numeric", &json!(0.001), &json!("1e-3")));
        assert!(same_value("numeric", &json!("NaN"), &json!("nan")));
        assert!(same_value("double precision", &json!("-Infinity"), &json!("-inf")));
        assert!(!same_value("numeric", &json!(10), &json!(1)));
        assert!(!same_value("numeric", &json!(-1), &json!(1)));
        assert!(!same_value("numeric", &json!(1), &json!("1x")));
        assert!(!same_value("numeric", &json!(1), &json!("1e99999999999999999999")));
        assert_eq!(parse_decimal("."), None);
        assert_eq!(parse_decimal("-"), None);
        assert_eq!(parse_decimal(".5"), parse_decimal("0.50"));
    }

    #[test]
    fn json_compares_structurally() {
        let stored = json!({"a": [1, 2.0, {"x": null}], "b": "t"});
        assert!(same_value("jsonb", &stored, &json!({"b": "t", "a": [1.0, 2, {"x": null}]})));
        assert!(same_value("json", &stored, &json!({"b": "t", "a": [1.0, 2, {"x": null}]})));
        assert!(!same_value("jsonb", &stored, &json!({"b": "t", "a": [1, 2, {}]})));
        assert!(!same_value("jsonb", &stored, &json!({"b": "t", "a": [2, 1, {"x": null}]})));
        assert!(!same_value("jsonb", &json!("{\"a\":1}"), &json!({"a": 1})), "a string is not the object it spells");
    }

    #[test]
    fn booleans_text_uuids_and_nulls() {
        assert!(same_value("boolean", &json!(true), &json!("yes")));
        assert!(same_value("boolean", &json!(false), &json!(" OFF ")));
        assert!(same_value("boolean", &json!(true), &json!("t")));
        assert!(!same_value("boolean", &json!(true), &json!("o")), "ambiguous prefix");
        assert!(!same_value("boolean", &json!(true), &json!(false)));
        assert!(!same_value("boolean", &json!(true), &json!(1)));
        assert!(!same_value("text", &json!("Tea"), &json!("tea")));
        assert!(!same_value("character varying(20)", &json!("Tea "), &json!("Tea")));
        assert!(same_value("character(5)", &json!("ab   "), &json!("ab")));
        let id = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        assert!(same_value("uuid", &json!(id), &json!(id.to_uppercase())));
        assert!(same_value("uuid", &json!(id), &json!("{A0EEBC999C0B4EF8BB6D6BB9BD380A11}")));
        assert!(!same_value("uuid", &json!(id), &json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12")));
        assert!(same_value("integer", &Value::Null, &Value::Null));
        assert!(!same_value("integer", &Value::Null, &json!(0)));
        assert!(!same_value("text", &json!(""), &Value::Null));
    }

    #[test]
    fn unknown_types_and_arrays() {
        assert!(same_value("public.mood", &json!("happy"), &json!("happy")));
        assert!(!same_value("public.mood", &json!(1), &json!(1.0)));
        assert!(same_value("numeric(4,1)[]", &json!([1.0, 2.5]), &json!([1, "2.50"])));
        assert!(same_value("integer[]", &json!([[1, 2], [3, 4]]), &json!([[1, 2], [3, 4.0]])));
        assert!(!same_value("integer[]", &json!([1, 2]), &json!([1, 2, 3])));
        assert!(same_value("timestamp with time zone[]", &json!(["2026-01-01T10:00:00+00:00"]), &json!(["2026-01-01T10:00:00.000Z"])));
    }

    #[test]
    fn base_types_drop_modifiers() {
        assert_eq!(base_type("numeric(10,2)"), "numeric");
        assert_eq!(base_type("timestamp(3) with time zone"), "timestamp with time zone");
        assert_eq!(base_type("character varying(40)[]"), "character varying[]");
    }

    #[test]
    fn images_keep_the_values_written() {
        let mut image = obj(json!({"id": 1, "at": "2026-01-01T10:00:00+00:00", "price": 2.0, "name": "Tea", "note": "x"}));
        let written = obj(json!({"at": "2026-01-01T10:00:00.000Z", "price": 2, "name": "tea", "gone": 1}));
        let types = |c: &str| match c {
            "at" => Some(TZ),
            "price" => Some("numeric(10,2)"),
            _ => Some("text"),
        };
        keep_as_written(&mut image, &written, types);
        assert_eq!(Value::Object(image), json!({"id": 1, "at": "2026-01-01T10:00:00.000Z", "price": 2, "name": "Tea", "note": "x"}));
    }

    fn obj(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    /// `text` as Postgres renders a timestamptz at `offset` seconds east: the fraction without
    /// trailing zeros, the offset as `+HH:MM` (with seconds when it has them).
    fn postgres_rendering(utc: NaiveDateTime, offset: i32) -> String {
        let local = utc + TimeDelta::seconds(offset.into());
        let mut text = local.format("%Y-%m-%dT%H:%M:%S").to_string();
        let micros = local.and_utc().timestamp_subsec_micros();
        if micros > 0 {
            text.push_str(format!(".{micros:06}").trim_end_matches('0'));
        }
        let (sign, abs) = if offset < 0 { ('-', -offset) } else { ('+', offset) };
        text.push_str(&format!("{sign}{:02}:{:02}", abs / 3600, abs % 3600 / 60));
        if abs % 60 != 0 {
            text.push_str(&format!(":{:02}", abs % 60));
        }
        text
    }

    fn arb_instant() -> impl Strategy<Value = NaiveDateTime> {
        // 1900..2100, in milliseconds (what a JavaScript Date holds).
        (-2_208_988_800_000i64..4_102_444_800_000).prop_map(|ms| chrono::DateTime::from_timestamp_millis(ms).unwrap().naive_utc())
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-1000i64..1000).prop_map(|n| json!(n)),
            "[a-c]{0,3}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-d]", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// The same JSON with every integer written as a float (`3` → `3.0`).
    fn as_floats(value: &Value) -> Value {
        match value {
            Value::Number(n) => json!(n.as_f64().unwrap()),
            Value::Array(a) => Value::Array(a.iter().map(as_floats).collect()),
            Value::Object(o) => Value::Object(o.iter().map(|(k, v)| (k.clone(), as_floats(v))).collect()),
            other => other.clone(),
        }
    }

    proptest! {
        /// A JavaScript `toISOString()` and Postgres's rendering at any offset are the same
        /// instant; a millisecond apart they are not.
        #[test]
        fn iso_strings_and_postgres_renderings_agree(utc in arb_instant(), offset in -14 * 3600..14 * 3600i32, apart in 1i64..86_400_000) {
            let js = json!(utc.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string());
            let rendered = json!(postgres_rendering(utc, offset));
            prop_assert!(same_value(TZ, &rendered, &js), "{} vs {}", rendered, js);
            prop_assert!(same_value(TZ, &js, &rendered));
            let other = json!(postgres_rendering(utc + TimeDelta::milliseconds(apart), offset));
            prop_assert!(!same_value(TZ, &other, &js), "{} vs {}", other, js);
        }

        /// A decimal with trailing zeros, as a string or a number, is its value; another value is not.
        #[test]
        fn decimals_with_trailing_zeros_agree(mantissa in -10_000_000i64..10_000_000, scale in 0u32..6, zeros in 0usize..4, delta in 1i64..1000) {
            let text = |m: i64| {
                let digits = format!("{:0>width$}", m.unsigned_abs(), width = scale as usize + 1);
                let (whole, fraction) = digits.split_at(digits.len() - scale as usize);
                let sign = if m < 0 { "-" } else { "" };
                let fraction = format!("{fraction}{}", "0".repeat(zeros));
                if fraction.is_empty() { format!("{sign}{whole}") } else { format!("{sign}{whole}.{fraction}") }
            };
            let stored: Value = serde_json::from_str(&text(mantissa)).unwrap();
            prop_assert!(same_value("numeric(20,8)", &stored, &json!(text(mantissa))));
            prop_assert!(same_value("numeric(20,8)", &json!(text(mantissa)), &stored));
            prop_assert!(!same_value("numeric(20,8)", &stored, &json!(text(mantissa + delta))));
        }

        /// Every value is the same as itself whatever the type, the relation is symmetric, and
        /// jsonb ignores how integers are spelled.
        #[test]
        fn reflexive_and_symmetric(a in arb_json(), b in arb_json(),
            ty in prop::sample::select(vec![TZ, "date", "numeric", "jsonb", "boolean", "uuid", "text", "integer[]", "character(4)", "mood"])) {
            prop_assert!(same_value(ty, &a, &a));
            prop_assert_eq!(same_value(ty, &a, &b), same_value(ty, &b, &a));
            prop_assert!(same_value("jsonb", &a, &as_floats(&a)));
            prop_assert_eq!(same_value("mood", &a, &b), a == b);
        }

        /// A uuid in any case and notation is itself; another is not.
        #[test]
        fn uuids_ignore_case_and_notation(bytes in any::<[u8; 16]>(), other in any::<[u8; 16]>(), braces in any::<bool>()) {
            let id = uuid::Uuid::from_bytes(bytes);
            let written = if braces { format!("{{{}}}", id.simple().to_string().to_uppercase()) } else { id.to_string().to_uppercase() };
            prop_assert!(same_value("uuid", &json!(id.to_string()), &json!(written)));
            prop_assert_eq!(same_value("uuid", &json!(id.to_string()), &json!(uuid::Uuid::from_bytes(other).to_string())), bytes == other);
        }
    }
}
