//! Supabase `postgres_changes` filter strings (`col=op.value`, comma = AND) turned into the
//! hub's subscription conditions, with values typed by the column's Postgres type as Postgres
//! would cast them. Accepts what realtime-js's `RealtimePostgresFilterBuilder` writes for the
//! operators the hub evaluates (PostgREST-style double quotes included). Pure code.

use std::borrow::Cow;

use protocol::{Condition, FilterOp};
use serde_json::{Number, Value};

use super::types::supabase_type_name;

/// The operators [`parse_filter`] accepts, for error messages.
pub const SUPPORTED_OPERATORS: &str = "eq, neq, lt, lte, gt, gte, in, is (null, true, false), and not.eq, not.neq, not.is";

/// Parses a `postgres_changes` filter: `col=op.value` conditions joined by commas (AND), `op`
/// one of [`SUPPORTED_OPERATORS`], `in.(a,b,"c,d")` for lists. `column_type` gives a column's
/// `format_type` (`None`: the table lacks it). An empty filter is no condition at all.
///
/// Values are typed as Postgres casts them to the column's type: numbers for integer and
/// decimal types, `true`/`false` for `boolean`, a canonical lowercase string for `uuid`, the
/// text as written otherwise. A value or list item in double quotes may hold `,()"\` (with `\`
/// escaping the next character), as the client's filter builder writes it. An unquoted value
/// runs to the next comma that starts another `col=` condition, so a value such as `Oslo,
/// Norway` written by hand stays whole.
pub fn parse_filter<'t>(
    filter: &str,
    column_type: impl Fn(&str) -> Option<&'t str>,
) -> Result<Vec<Condition>, String> {
    let mut conditions = Vec::new();
    if filter.is_empty() {
        return Ok(conditions);
    }
    let mut rest = filter;
    loop {
        let (condition, next) = parse_condition(rest, &column_type)?;
        protocol::filter::check(&condition)?;
        conditions.push(condition);
        match next {
            Some(next) => rest = next,
            None => return Ok(conditions),
        }
    }
}

/// Whether a column of this `format_type` holds numbers (its filter values are JSON numbers).
pub fn is_numeric_type(sql_type: &str) -> bool {
    matches!(ValueKind::of(sql_type), ValueKind::Integer { .. } | ValueKind::Decimal)
}

/// Whether a column of this `format_type` is `boolean`.
pub fn is_boolean_type(sql_type: &str) -> bool {
    ValueKind::of(sql_type) == ValueKind::Boolean
}

/// One condition from the start of `text`, and the text after its trailing comma (if any).
fn parse_condition<'f, 't>(
    text: &'f str,
    column_type: &impl Fn(&str) -> Option<&'t str>,
) -> Result<(Condition, Option<&'f str>), String> {
    let Some((column, after_column)) = text.split_once('=') else {
        return Err(format!("`{}` is not a `column=operator.value` condition", first_part(text)));
    };
    if column.is_empty() {
        return Err(format!("`{}` names no column", first_part(text)));
    }
    // `not.` negates the operator after it (`not.is.null`, `not.eq.5`).
    let (negated, after_column) = match after_column.strip_prefix("not.") {
        Some(rest) => (true, rest),
        None => (false, after_column),
    };
    let op_end = after_column.find(['.', ',']).filter(|&i| after_column.as_bytes()[i] == b'.');
    let Some(op_end) = op_end else {
        return Err(format!("`{}`: expected `operator.value` after `{column}=`", first_part(text)));
    };
    let (op_name, value_text) = (&after_column[..op_end], &after_column[op_end + 1..]);
    let Some(sql_type) = column_type(column) else {
        return Err(format!("column `{column}` does not exist"));
    };
    if op_name == "is" {
        // `is.null`, `is.true`, `is.false`: equality with that value (a missing column reads as
        // null), negated by `not.`.
        let (raw, rest) = parse_scalar(value_text)?;
        let value = match raw.to_ascii_lowercase().as_str() {
            "null" => Value::Null,
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(format!("`{column}=is.{raw}`: `is` takes null, true or false")),
        };
        let op = if negated { FilterOp::Neq } else { FilterOp::Eq };
        return Ok((Condition { column: column.to_owned(), op, value }, next_condition(rest)?));
    }
    let op = match (operator(op_name)?, negated) {
        (op, false) => op,
        (FilterOp::Eq, true) => FilterOp::Neq,
        (FilterOp::Neq, true) => FilterOp::Eq,
        (_, true) => return Err(format!("`not.{op_name}` is not supported; supported operators: {SUPPORTED_OPERATORS}")),
    };
    let kind = ValueKind::of(sql_type);
    let (value, rest) = if op == FilterOp::In {
        let (items, rest) = parse_list(value_text)?;
        let items = items.iter().map(|item| kind.typed(column, sql_type, item)).collect::<Result<_, _>>()?;
        (Value::Array(items), rest)
    } else {
        let (raw, rest) = parse_scalar(value_text)?;
        (kind.typed(column, sql_type, &raw)?, rest)
    };
    let condition = Condition { column: column.to_owned(), op, value };
    Ok((condition, next_condition(rest)?))
}

/// The text of a failing condition for messages: up to the next comma, shortened.
fn first_part(text: &str) -> String {
    let part = text.split(',').next().unwrap_or(text);
    match part.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &part[..cut]),
        None => part.to_owned(),
    }
}

fn operator(op: &str) -> Result<FilterOp, String> {
    Ok(match op {
        "eq" => FilterOp::Eq,
        "neq" => FilterOp::Neq,
        "lt" => FilterOp::Lt,
        "lte" => FilterOp::Lte,
        "gt" => FilterOp::Gt,
        "gte" => FilterOp::Gte,
        "in" => FilterOp::In,
        "not" => return Err(format!("`not.not` is not a condition; supported operators: {SUPPORTED_OPERATORS}")),
        other => return Err(format!("operator `{other}` is not supported; supported operators: {SUPPORTED_OPERATORS}")),
    })
}

/// What follows a value: the end, or a comma and the next condition.
fn next_condition(rest: &str) -> Result<Option<&str>, String> {
    if rest.is_empty() {
        return Ok(None);
    }
    match rest.strip_prefix(',') {
        Some("") => Err("the filter ends with a comma".to_owned()),
        Some(next) => Ok(Some(next)),
        None => Err(format!("unexpected `{}` after a value", first_part(rest))),
    }
}

/// A scalar value: double-quoted, or the text up to the comma that starts the next condition.
fn parse_scalar(text: &str) -> Result<(Cow<'_, str>, &str), String> {
    if text.starts_with('"') {
        let (value, rest) = parse_quoted(text)?;
        return Ok((Cow::Owned(value), rest));
    }
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b',' if depth == 0 && starts_condition(&text[i + 1..]) => {
                return Ok((Cow::Borrowed(&text[..i]), &text[i..]));
            }
            _ => {}
        }
    }
    Ok((Cow::Borrowed(text), ""))
}

/// Whether `text` begins like a condition, `column=`: a comma before it separates conditions.
fn starts_condition(text: &str) -> bool {
    let name_len = text.find(['=', ',', '(', ')', '"']).unwrap_or(text.len());
    name_len > 0 && text[name_len..].starts_with('=')
}

/// A PostgREST-quoted string at the start of `text` (which starts with `"`): `\` takes the
/// next character literally. Returns the unquoted text and what follows the closing quote.
fn parse_quoted(text: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices().skip(1);
    while let Some((_, c)) = chars.next() {
        match c {
            '"' => {
                let after = chars.next().map_or(text.len(), |(i, _)| i);
                return Ok((value, &text[after..]));
            }
            '\\' => match chars.next() {
                Some((_, escaped)) => value.push(escaped),
                None => break,
            },
            c => value.push(c),
        }
    }
    Err(format!("unterminated quoted value `{}`", first_part(text)))
}

/// The items of `(a,b,"c,d")` at the start of `text`, and what follows the `)`. Unquoted items
/// lose surrounding whitespace, as in a Postgres array literal.
fn parse_list(text: &str) -> Result<(Vec<Cow<'_, str>>, &str), String> {
    let Some(mut rest) = text.strip_prefix('(') else {
        return Err(format!("`in` takes a list in parentheses, `in.(a,b)`, not `{}`", first_part(text)));
    };
    let mut items = Vec::new();
    loop {
        let item_start = rest.trim_start_matches(is_array_space);
        let (item, after) = if item_start.starts_with('"') {
            let (item, after) = parse_quoted(item_start)?;
            (Cow::Owned(item), after.trim_start_matches(is_array_space))
        } else {
            let end = rest.find([',', ')']).unwrap_or(rest.len());
            let item = rest[..end].trim_matches(is_array_space);
            // An empty item is an empty string, as PostgREST reads it; an empty list is refused
            // (the client's builder refuses one too, and `IN ()` is not SQL).
            if item.is_empty() && items.is_empty() && rest[end..].starts_with(')') {
                return Err("`in` needs at least one value".to_owned());
            }
            (Cow::Borrowed(item), &rest[end..])
        };
        items.push(item);
        if let Some(after) = after.strip_prefix(',') {
            rest = after;
        } else if let Some(after) = after.strip_prefix(')') {
            return Ok((items, after));
        } else if after.is_empty() {
            return Err("unterminated `in` list: missing `)`".to_owned());
        } else {
            return Err(format!("unexpected `{}` in an `in` list", first_part(after)));
        }
    }
}

/// The whitespace Postgres's array input skips around an element.
fn is_array_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C')
}

/// How a column type's filter values are written in JSON.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ValueKind {
    /// `smallint`, `integer`, `bigint`: an integer in the type's range.
    Integer { min: i64, max: i64 },
    /// `numeric`, `real`, `double precision`: any finite number.
    Decimal,
    Boolean,
    /// Postgres reads a uuid in any case, with or without hyphens or braces; the hub holds the
    /// canonical lowercase form.
    Uuid,
    /// Everything else: the text as written.
    Text,
}

impl ValueKind {
    fn of(sql_type: &str) -> ValueKind {
        match supabase_type_name(sql_type).as_str() {
            "int2" => ValueKind::Integer { min: i16::MIN.into(), max: i16::MAX.into() },
            "int4" => ValueKind::Integer { min: i32::MIN.into(), max: i32::MAX.into() },
            "int8" => ValueKind::Integer { min: i64::MIN, max: i64::MAX },
            "numeric" | "float4" | "float8" => ValueKind::Decimal,
            "bool" => ValueKind::Boolean,
            "uuid" => ValueKind::Uuid,
            _ => ValueKind::Text,
        }
    }

    fn typed(self, column: &str, sql_type: &str, raw: &str) -> Result<Value, String> {
        // Postgres text cannot hold U+0000, so such a value could never match (and the hub
        // refuses it in any condition).
        if raw.contains('\0') {
            return Err(format!("the value for `{column}` holds the character U+0000"));
        }
        // Postgres ignores whitespace around a number, boolean or uuid it reads.
        let trimmed = raw.trim_matches(is_array_space);
        let invalid = |what: &str| format!("`{column}` is {sql_type}: `{raw}` is not {what}");
        let out_of_range = || format!("`{column}` is {sql_type}: `{raw}` is out of range");
        match self {
            ValueKind::Integer { min, max } => match trimmed.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(Value::from(n)),
                Ok(_) => Err(out_of_range()),
                Err(_) if trimmed.parse::<i128>().is_ok() => Err(out_of_range()),
                Err(_) => Err(invalid("an integer")),
            },
            ValueKind::Decimal => decimal(trimmed).ok_or_else(|| invalid("a finite number")),
            ValueKind::Boolean => match trimmed.to_ascii_lowercase().as_str() {
                "true" | "t" | "yes" | "y" | "on" | "1" => Ok(Value::Bool(true)),
                "false" | "f" | "no" | "n" | "off" | "0" => Ok(Value::Bool(false)),
                _ => Err(invalid("a boolean (true or false)")),
            },
            ValueKind::Uuid => uuid(trimmed).map(Value::String).ok_or_else(|| invalid("a uuid")),
            ValueKind::Text => Ok(Value::String(raw.to_owned())),
        }
    }
}

/// A decimal literal as a JSON number: integers exactly, others as the nearest double.
fn decimal(text: &str) -> Option<Value> {
    // Rust's float syntax also takes `inf`/`nan`, which JSON cannot carry: only digits, a
    // point, a sign and an exponent are let through.
    let plain = text.bytes().any(|b| b.is_ascii_digit())
        && text.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'+' | b'-' | b'e' | b'E'));
    if !plain {
        return None;
    }
    if let Ok(n) = text.parse::<i64>() {
        return Some(n.into());
    }
    if let Ok(n) = text.parse::<u64>() {
        return Some(n.into());
    }
    text.parse::<f64>().ok().and_then(Number::from_f64).map(Value::Number)
}

/// The canonical `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` lowercase form of a uuid as Postgres
/// reads it (optional braces, optional hyphens), or `None`.
fn uuid(text: &str) -> Option<String> {
    let inner = text.strip_prefix('{').and_then(|t| t.strip_suffix('}')).unwrap_or(text);
    if inner.starts_with('-') || inner.ends_with('-') || inner.contains("--") {
        return None;
    }
    let hex: Vec<u8> = inner.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = String::with_capacity(36);
    for (i, b) in hex.iter().enumerate() {
        if matches!(i, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        out.push(b.to_ascii_lowercase() as char);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn catalog(column: &str) -> Option<&'static str> {
        Some(match column {
            "id" => "bigint",
            "age" => "integer",
            "small" => "smallint",
            "price" => "numeric(10,2)",
            "ratio" => "double precision",
            "score" => "real",
            "active" => "boolean",
            "name" => "text",
            "code" => "character varying(20)",
            "owner" => "uuid",
            "created_at" => "timestamp with time zone",
            "doc" => "jsonb",
            "tags" => "text[]",
            "status" => "public.status",
            _ => return None,
        })
    }

    fn parse(filter: &str) -> Result<Vec<Condition>, String> {
        parse_filter(filter, catalog)
    }

    fn cond(column: &str, op: FilterOp, value: Value) -> Condition {
        Condition { column: column.into(), op, value }
    }

    /// realtime-js `serializeScalar`: quote when a reserved character `,()"\` or surrounding
    /// whitespace is present (JS `trim`), escaping `\` and `"`.
    fn js_serialize_scalar(value: &str) -> String {
        let js_trimmed = value.trim_matches(|c: char| (c.is_whitespace() && c != '\u{85}') || c == '\u{FEFF}');
        if value.contains([',', '(', ')', '"', '\\']) || js_trimmed != value {
            format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
        } else {
            value.to_owned()
        }
    }

    #[test]
    fn the_empty_filter_has_no_conditions() {
        assert_eq!(parse(""), Ok(vec![]));
    }

    #[test]
    fn each_operator() {
        for (op_text, op) in [
            ("eq", FilterOp::Eq),
            ("neq", FilterOp::Neq),
            ("lt", FilterOp::Lt),
            ("lte", FilterOp::Lte),
            ("gt", FilterOp::Gt),
            ("gte", FilterOp::Gte),
        ] {
            assert_eq!(parse(&format!("id={op_text}.5")), Ok(vec![cond("id", op, json!(5))]));
        }
        assert_eq!(parse("id=in.(1,2,3)"), Ok(vec![cond("id", FilterOp::In, json!([1, 2, 3]))]));
    }

    #[test]
    fn values_are_typed_by_column_type() {
        assert_eq!(parse("age=eq.-42"), Ok(vec![cond("age", FilterOp::Eq, json!(-42))]));
        assert_eq!(parse("small=lt.+7"), Ok(vec![cond("small", FilterOp::Lt, json!(7))]));
        assert_eq!(parse("price=gte.10.50"), Ok(vec![cond("price", FilterOp::Gte, json!(10.5))]));
        assert_eq!(parse("price=gte.12"), Ok(vec![cond("price", FilterOp::Gte, json!(12))]));
        assert_eq!(parse("ratio=lt.1e-3"), Ok(vec![cond("ratio", FilterOp::Lt, json!(0.001))]));
        assert_eq!(parse("score=gt..5"), Ok(vec![cond("score", FilterOp::Gt, json!(0.5))]));
        assert_eq!(parse("price=eq.18446744073709551615"), Ok(vec![cond("price", FilterOp::Eq, json!(u64::MAX))]));
        assert_eq!(parse("active=eq.true"), Ok(vec![cond("active", FilterOp::Eq, json!(true))]));
        assert_eq!(parse("active=eq.f"), Ok(vec![cond("active", FilterOp::Eq, json!(false))]));
        assert_eq!(parse("active=neq.T"), Ok(vec![cond("active", FilterOp::Neq, json!(true))]));
        assert_eq!(parse("active=in.(t,false)"), Ok(vec![cond("active", FilterOp::In, json!([true, false]))]));
        assert_eq!(parse("name=eq.42"), Ok(vec![cond("name", FilterOp::Eq, json!("42"))]));
        assert_eq!(parse("code=eq.true"), Ok(vec![cond("code", FilterOp::Eq, json!("true"))]));
        assert_eq!(
            parse("created_at=gt.2024-01-01T00:00:00Z"),
            Ok(vec![cond("created_at", FilterOp::Gt, json!("2024-01-01T00:00:00Z"))])
        );
        assert_eq!(parse("status=eq.open"), Ok(vec![cond("status", FilterOp::Eq, json!("open"))]));
        assert_eq!(parse("tags=eq.{a,b}"), Ok(vec![cond("tags", FilterOp::Eq, json!("{a,b}"))]));
        // Text is kept as written, spaces and all.
        assert_eq!(parse("name=eq. hello world"), Ok(vec![cond("name", FilterOp::Eq, json!(" hello world"))]));
        assert_eq!(parse("name=eq."), Ok(vec![cond("name", FilterOp::Eq, json!(""))]));
        assert_eq!(parse("name=eq.a=b.c"), Ok(vec![cond("name", FilterOp::Eq, json!("a=b.c"))]));
    }

    #[test]
    fn uuids_are_canonical() {
        let canonical = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        for written in [
            canonical,
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11",
        ] {
            assert_eq!(parse(&format!("owner=eq.{written}")), Ok(vec![cond("owner", FilterOp::Eq, json!(canonical))]));
        }
        for bad in ["nope", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1", "-a0eebc999c0b4ef8bb6d6bb9bd380a11", "a0eebc99--9c0b4ef8bb6d6bb9bd380a11"] {
            let err = parse(&format!("owner=eq.{bad}")).unwrap_err();
            assert!(err.contains("is not a uuid"), "{err}");
        }
    }

    #[test]
    fn refuses_values_that_do_not_fit_the_column_type() {
        assert_eq!(parse("age=eq.abc").unwrap_err(), "`age` is integer: `abc` is not an integer");
        assert_eq!(parse("age=eq.1.5").unwrap_err(), "`age` is integer: `1.5` is not an integer");
        assert_eq!(parse("age=eq.2147483648").unwrap_err(), "`age` is integer: `2147483648` is out of range");
        assert_eq!(parse("small=eq.40000").unwrap_err(), "`small` is smallint: `40000` is out of range");
        assert_eq!(parse("id=eq.9223372036854775808").unwrap_err(), "`id` is bigint: `9223372036854775808` is out of range");
        assert_eq!(
            parse("price=eq.NaN").unwrap_err(),
            "`price` is numeric(10,2): `NaN` is not a finite number"
        );
        for bad in ["inf", "Infinity", "1e400", "", "1.2.3x", "null", "0x10"] {
            assert!(parse(&format!("ratio=eq.{bad}")).is_err(), "{bad}");
        }
        assert_eq!(parse("active=eq.maybe").unwrap_err(), "`active` is boolean: `maybe` is not a boolean (true or false)");
        assert!(parse("id=in.(1,x)").unwrap_err().contains("`x` is not an integer"));
    }

    #[test]
    fn several_conditions_are_anded() {
        assert_eq!(
            parse("id=gt.0,id=lt.100"),
            Ok(vec![cond("id", FilterOp::Gt, json!(0)), cond("id", FilterOp::Lt, json!(100))])
        );
        assert_eq!(
            parse("name=in.(a,b),age=gte.18,active=eq.true"),
            Ok(vec![
                cond("name", FilterOp::In, json!(["a", "b"])),
                cond("age", FilterOp::Gte, json!(18)),
                cond("active", FilterOp::Eq, json!(true)),
            ])
        );
    }

    #[test]
    fn reads_what_the_js_filter_builder_writes() {
        // postgresChangesFilter().eq('id', 1).lt('age', 30)
        assert_eq!(parse("id=eq.1,age=lt.30"), Ok(vec![cond("id", FilterOp::Eq, json!(1)), cond("age", FilterOp::Lt, json!(30))]));
        // .eq('name', 'a,b') / .eq('name', 'say "hi"') / .eq('name', ' padded ')
        assert_eq!(parse(r#"name=eq."a,b""#), Ok(vec![cond("name", FilterOp::Eq, json!("a,b"))]));
        assert_eq!(parse(r#"name=eq."say \"hi\"""#), Ok(vec![cond("name", FilterOp::Eq, json!("say \"hi\""))]));
        assert_eq!(parse(r#"name=eq." padded ""#), Ok(vec![cond("name", FilterOp::Eq, json!(" padded "))]));
        assert_eq!(parse(r#"name=eq."back\\slash""#), Ok(vec![cond("name", FilterOp::Eq, json!("back\\slash"))]));
        // .in('name', ['a b', 'c,d', 'e(f)']).eq('age', 3)
        assert_eq!(
            parse(r#"name=in.(a b,"c,d","e(f)"),age=eq.3"#),
            Ok(vec![cond("name", FilterOp::In, json!(["a b", "c,d", "e(f)"])), cond("age", FilterOp::Eq, json!(3))])
        );
        // .in('id', [1, 2]) with a boolean and a number rendered by String().
        assert_eq!(parse("id=in.(1,2)"), Ok(vec![cond("id", FilterOp::In, json!([1, 2]))]));
        // A quoted number still reads as a number for a numeric column.
        assert_eq!(parse(r#"id=eq."7""#), Ok(vec![cond("id", FilterOp::Eq, json!(7))]));
    }

    #[test]
    fn commas_split_only_before_another_condition() {
        // Written by hand, unquoted: the comma is part of the value, as older servers read it.
        assert_eq!(parse("name=eq.Oslo, Norway"), Ok(vec![cond("name", FilterOp::Eq, json!("Oslo, Norway"))]));
        assert_eq!(parse("name=eq.f(a,b=1),age=eq.1"), Ok(vec![cond("name", FilterOp::Eq, json!("f(a,b=1)")), cond("age", FilterOp::Eq, json!(1))]));
        assert_eq!(parse("name=in.( a , b )"), Ok(vec![cond("name", FilterOp::In, json!(["a", "b"]))]));
        assert_eq!(parse(r#"name=in.( "a" , "" )"#), Ok(vec![cond("name", FilterOp::In, json!(["a", ""]))]));
    }

    #[test]
    fn refuses_unsupported_operators_naming_them() {
        for (filter, op) in [
            ("name=like.%a%", "like"),
            ("name=ilike.%a%", "ilike"),
            ("name=match.^a", "match"),
            ("name=imatch.^a", "imatch"),
            ("name=isdistinct.a", "isdistinct"),
            ("name=cs.{a}", "cs"),
            ("name=EQ.a", "EQ"),
        ] {
            assert_eq!(parse(filter).unwrap_err(), format!("operator `{op}` is not supported; supported operators: {SUPPORTED_OPERATORS}"));
        }
        assert_eq!(
            parse("status=not.in.(draft,archived)").unwrap_err(),
            format!("`not.in` is not supported; supported operators: {SUPPORTED_OPERATORS}")
        );
        assert_eq!(parse("name=is.maybe").unwrap_err(), "`name=is.maybe`: `is` takes null, true or false");
    }

    #[test]
    fn is_and_not_are_equalities_with_null_true_and_false() {
        assert_eq!(parse("name=is.null"), Ok(vec![cond("name", FilterOp::Eq, Value::Null)]));
        assert_eq!(parse("name=not.is.null"), Ok(vec![cond("name", FilterOp::Neq, Value::Null)]));
        assert_eq!(parse("name=is.TRUE,id=not.eq.3"), Ok(vec![cond("name", FilterOp::Eq, json!(true)), cond("id", FilterOp::Neq, json!(3))]));
        assert_eq!(parse("id=not.neq.3"), Ok(vec![cond("id", FilterOp::Eq, json!(3))]));
        // As a filter over rows: a missing column reads as null.
        let row = |v: Value| v.as_object().unwrap().clone();
        let null = parse("name=is.null").unwrap();
        assert!(protocol::filter::matches(&null, &row(json!({"id": 1}))));
        assert!(!protocol::filter::matches(&null, &row(json!({"name": "a"}))));
        assert!(protocol::filter::matches(&parse("name=not.is.null").unwrap(), &row(json!({"name": "a"}))));
    }

    #[test]
    fn refuses_malformed_filters() {
        assert_eq!(parse("nope").unwrap_err(), "`nope` is not a `column=operator.value` condition");
        assert_eq!(parse("=eq.1").unwrap_err(), "`=eq.1` names no column");
        assert_eq!(parse("id=1").unwrap_err(), "`id=1`: expected `operator.value` after `id=`");
        assert_eq!(parse("id=eq,age=eq.1").unwrap_err(), "`id=eq`: expected `operator.value` after `id=`");
        assert_eq!(parse("missing=eq.1").unwrap_err(), "column `missing` does not exist");
        assert_eq!(parse("id=eq.1,").unwrap_err(), "`id` is bigint: `1,` is not an integer");
        assert_eq!(parse("id=in.(1,2),").unwrap_err(), "the filter ends with a comma");
        assert_eq!(parse("id=in.()").unwrap_err(), "`in` needs at least one value");
        assert_eq!(parse("id=in.(1,,2)").unwrap_err(), "`id` is bigint: `` is not an integer");
        assert_eq!(parse("name=in.(a,,b)"), Ok(vec![cond("name", FilterOp::In, json!(["a", "", "b"]))]));
        assert_eq!(parse("id=in.(1,2").unwrap_err(), "unterminated `in` list: missing `)`");
        assert_eq!(parse("id=in.1,2").unwrap_err(), "`in` takes a list in parentheses, `in.(a,b)`, not `1`");
        assert_eq!(parse("id=in.(1)x").unwrap_err(), "unexpected `x` after a value");
        assert_eq!(parse(r#"name=in.("a"b)"#).unwrap_err(), "unexpected `b)` in an `in` list");
        assert_eq!(parse(r#"name=eq."open"#).unwrap_err(), r#"unterminated quoted value `"open`"#);
        assert_eq!(parse(r#"name=eq."a\"#).unwrap_err(), r#"unterminated quoted value `"a\`"#);
        assert_eq!(parse(r#"name=eq."a"b"#).unwrap_err(), "unexpected `b` after a value");
        assert!(parse("id=eq.1,bogus").unwrap_err().contains("not an integer"));
        assert!(parse("age=eq.1,missing=eq.2").unwrap_err().contains("`missing` does not exist"));
        // Ordering a boolean is beyond the hub's conditions.
        assert_eq!(parse("active=gt.true").unwrap_err(), "`active` is compared with a number or a string only");
    }

    #[test]
    fn refuses_nul() {
        let err = parse("name=eq.a\0b").unwrap_err();
        assert_eq!(err, "the value for `name` holds the character U+0000");
        assert!(parse("name=in.(ok,\"x\0\")").is_err());
        assert!(parse("id=eq.\0").is_err());
    }

    #[test]
    fn type_predicates() {
        for numeric in ["integer", "bigint", "smallint", "numeric", "numeric(10,2)", "real", "double precision"] {
            assert!(is_numeric_type(numeric), "{numeric}");
        }
        for other in ["text", "boolean", "uuid", "integer[]", "jsonb", "character varying(3)", "money"] {
            assert!(!is_numeric_type(other), "{other}");
        }
        assert!(is_boolean_type("boolean"));
        assert!(!is_boolean_type("boolean[]"));
        assert!(!is_boolean_type("text"));
    }

    #[test]
    fn long_conditions_are_shortened_in_messages() {
        let long = "x".repeat(200);
        let err = parse(&long).unwrap_err();
        assert!(err.len() < 120, "{err}");
        assert!(err.contains('…'));
    }

    fn text_value() -> impl Strategy<Value = String> {
        proptest::string::string_regex("[a-zA-Z0-9 ,()\"\\\\=.é☕\t\u{85}\u{a0}-]{0,16}").unwrap()
    }

    proptest! {
        #[test]
        fn any_integer_round_trips(n in any::<i64>(), m in any::<i64>()) {
            prop_assert_eq!(parse(&format!("id=eq.{n}")), Ok(vec![cond("id", FilterOp::Eq, json!(n))]));
            prop_assert_eq!(
                parse(&format!("id=in.({n},{m}),price=lt.{m}")),
                Ok(vec![cond("id", FilterOp::In, json!([n, m])), cond("price", FilterOp::Lt, json!(m))])
            );
        }

        #[test]
        fn any_finite_double_round_trips(x in any::<f64>().prop_filter("finite", |x| x.is_finite())) {
            // JS `String(x)` differs in notation, Rust's `{x:?}` is also a shortest round-trip form.
            let conditions = parse(&format!("ratio=eq.{x:?}")).unwrap();
            prop_assert_eq!(conditions[0].value.as_f64(), Some(x));
        }

        #[test]
        fn builder_strings_round_trip(a in text_value(), b in text_value(), c in text_value()) {
            let filter = format!(
                "name=eq.{},code=in.({},{}),name=neq.{}",
                js_serialize_scalar(&a), js_serialize_scalar(&b), js_serialize_scalar(&c), js_serialize_scalar(&c),
            );
            prop_assert_eq!(parse(&filter), Ok(vec![
                cond("name", FilterOp::Eq, json!(a)),
                cond("code", FilterOp::In, json!([b, c])),
                cond("name", FilterOp::Neq, json!(c)),
            ]), "{}", filter);
        }

        #[test]
        fn never_panics(filter in any::<String>()) {
            let _ = parse(&filter);
        }

        #[test]
        fn never_panics_on_filter_like_text(filter in "[a-z=.,()\"\\\\ 0-9]{0,30}") {
            let _ = parse(&filter);
        }
    }
}
