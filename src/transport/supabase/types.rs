//! Postgres column type names as Supabase Realtime sends them in `columns[].type`: the
//! `pg_type.typname` (`int4`, `timestamptz`, `_text`…), derived from the `format_type` text the
//! hub's catalog holds. supabase-js casts record values by these names (`lib/transformers.ts`),
//! so they must match Postgres's spelling exactly. Pure code.

/// The `typname` Supabase Realtime reports for a column whose `format_type` is `format_type`:
/// `integer` → `int4`, `character varying(20)` → `varchar`, `timestamp(3) with time zone` →
/// `timestamptz`, `text[]` → `_text`. Other names lose their `(…)` modifiers and, when
/// schema-qualified or quoted (`public."My Type"`), keep their last part unquoted (`My Type`).
pub fn supabase_type_name(format_type: &str) -> String {
    let parsed = Parsed::of(format_type);
    // Postgres names an array type `_` + the element's typname; nested arrays share it.
    let prefix = if parsed.array { "_" } else { "" };
    format!("{prefix}{}", parsed.element_typname())
}

/// `format_type` text split into its parts: `[]` and `(…)` outside quotes removed, the name
/// split at `.` outside quotes.
struct Parsed {
    /// The last dotted part, unquoted.
    name: String,
    /// Whether that part was written in double quotes (then it is a user's name, never an SQL
    /// keyword such as `integer`, even when spelled alike).
    quoted: bool,
    array: bool,
}

impl Parsed {
    fn of(format_type: &str) -> Parsed {
        let mut parts: Vec<(String, bool)> = vec![(String::new(), false)];
        let mut array = false;
        let mut chars = format_type.trim().chars().peekable();
        // Quotes delimit identifiers; inside them `(`, `[`, `.` and spaces are plain characters.
        while let Some(c) = chars.next() {
            let (current, quoted) = parts.last_mut().expect("parts is never empty");
            match c {
                '"' => {
                    *quoted = true;
                    while let Some(q) = chars.next() {
                        if q == '"' {
                            // `""` inside a quoted identifier is one quote character.
                            if chars.peek() == Some(&'"') {
                                chars.next();
                                current.push('"');
                            } else {
                                break;
                            }
                        } else {
                            current.push(q);
                        }
                    }
                }
                '(' | '[' => {
                    array |= c == '[';
                    skip_group(&mut chars, c);
                }
                '.' => parts.push((String::new(), false)),
                c if c.is_whitespace() => {
                    // Collapse runs and drop spaces left around a removed modifier, so that
                    // `timestamp(3) with time zone` reads `timestamp with time zone`.
                    if !current.is_empty() && !current.ends_with(' ') {
                        current.push(' ');
                    }
                }
                c => current.push(c),
            }
        }
        let (mut name, quoted) = parts.pop().expect("parts is never empty");
        if !quoted {
            name.truncate(name.trim_end().len());
        }
        Parsed { name, quoted, array }
    }

    fn element_typname(&self) -> &str {
        if self.quoted {
            return &self.name;
        }
        match self.name.as_str() {
            // The SQL-standard spellings `format_type` prints, plus common aliases.
            "integer" | "int" => "int4",
            "bigint" => "int8",
            "smallint" => "int2",
            "real" => "float4",
            "double precision" | "float" => "float8",
            "decimal" => "numeric",
            "boolean" => "bool",
            "character varying" | "char varying" => "varchar",
            "character" | "char" => "bpchar",
            "bit varying" => "varbit",
            "timestamp without time zone" | "timestamp" => "timestamp",
            "timestamp with time zone" => "timestamptz",
            "time without time zone" | "time" => "time",
            "time with time zone" => "timetz",
            // `interval year to month` and the like: the fields are a modifier too.
            name if name == "interval" || name.starts_with("interval ") => "interval",
            name => name,
        }
    }
}

/// Skips past the group opened by `open` (already consumed), nested groups and quoted text
/// included; an unclosed group runs to the end.
fn skip_group(chars: &mut std::iter::Peekable<std::str::Chars<'_>>, open: char) {
    let close = if open == '(' { ')' } else { ']' };
    let mut depth = 1usize;
    let mut in_quotes = false;
    for c in chars.by_ref() {
        match c {
            '"' => in_quotes = !in_quotes,
            _ if in_quotes => {}
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return;
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_standard_names_become_typnames() {
        for (format_type, typname) in [
            ("integer", "int4"),
            ("bigint", "int8"),
            ("smallint", "int2"),
            ("real", "float4"),
            ("double precision", "float8"),
            ("numeric", "numeric"),
            ("numeric(10,2)", "numeric"),
            ("boolean", "bool"),
            ("text", "text"),
            ("character varying", "varchar"),
            ("character varying(20)", "varchar"),
            ("character(3)", "bpchar"),
            ("\"char\"", "char"),
            ("bit(4)", "bit"),
            ("bit varying(8)", "varbit"),
            ("uuid", "uuid"),
            ("json", "json"),
            ("jsonb", "jsonb"),
            ("date", "date"),
            ("timestamp without time zone", "timestamp"),
            ("timestamp(3) without time zone", "timestamp"),
            ("timestamp with time zone", "timestamptz"),
            ("timestamp(6) with time zone", "timestamptz"),
            ("time without time zone", "time"),
            ("time(0) without time zone", "time"),
            ("time with time zone", "timetz"),
            ("bytea", "bytea"),
            ("interval", "interval"),
            ("interval(3)", "interval"),
            ("interval year to month", "interval"),
            ("interval day to second(3)", "interval"),
            ("money", "money"),
            ("int4range", "int4range"),
            ("tstzrange", "tstzrange"),
            ("inet", "inet"),
        ] {
            assert_eq!(supabase_type_name(format_type), typname, "{format_type}");
        }
    }

    #[test]
    fn arrays_are_underscore_and_the_element_typname() {
        for (format_type, typname) in [
            ("text[]", "_text"),
            ("integer[]", "_int4"),
            ("bigint[]", "_int8"),
            ("boolean[]", "_bool"),
            ("character varying(40)[]", "_varchar"),
            ("numeric(10,2)[]", "_numeric"),
            ("timestamp(3) with time zone[]", "_timestamptz"),
            ("uuid[]", "_uuid"),
            ("jsonb[]", "_jsonb"),
            // format_type prints one `[]` whatever the dimensions; be safe with more.
            ("integer[][]", "_int4"),
            ("integer[3]", "_int4"),
            ("public.mood[]", "_mood"),
        ] {
            assert_eq!(supabase_type_name(format_type), typname, "{format_type}");
        }
    }

    #[test]
    fn user_types_keep_their_last_part_unquoted() {
        assert_eq!(supabase_type_name("mood"), "mood");
        assert_eq!(supabase_type_name("public.mood"), "mood");
        assert_eq!(supabase_type_name("app.\"Order Status\""), "Order Status");
        assert_eq!(supabase_type_name("\"My.Schema\".\"a(b)\""), "a(b)");
        assert_eq!(supabase_type_name("\"say \"\"hi\"\"\""), "say \"hi\"");
        assert_eq!(supabase_type_name("extensions.citext"), "citext");
        assert_eq!(supabase_type_name("extensions.vector(3)"), "vector");
        // A quoted name is a user's type even when spelled like an SQL keyword.
        assert_eq!(supabase_type_name("public.\"integer\""), "integer");
        assert_eq!(supabase_type_name("  text  "), "text");
    }

    /// Every typname supabase-js's `convertCell` switches on (`lib/transformers.ts`, enum
    /// `PostgresTypes`) that a column can have, reached from its `format_type`.
    #[test]
    fn names_match_what_supabase_js_converts() {
        for (format_type, client_name) in [
            ("boolean", "bool"),
            ("date", "date"),
            ("daterange", "daterange"),
            ("real", "float4"),
            ("double precision", "float8"),
            ("smallint", "int2"),
            ("integer", "int4"),
            ("int4range", "int4range"),
            ("bigint", "int8"),
            ("int8range", "int8range"),
            ("json", "json"),
            ("jsonb", "jsonb"),
            ("money", "money"),
            ("numeric(12,4)", "numeric"),
            ("oid", "oid"),
            ("text", "text"),
            ("time without time zone", "time"),
            ("timestamp without time zone", "timestamp"),
            ("timestamp with time zone", "timestamptz"),
            ("time with time zone", "timetz"),
            ("tsrange", "tsrange"),
            ("tstzrange", "tstzrange"),
            ("abstime", "abstime"),
            ("reltime", "reltime"),
        ] {
            assert_eq!(supabase_type_name(format_type), client_name, "{format_type}");
            // The client reads a leading `_` as "array of", then casts each element by the rest.
            assert_eq!(supabase_type_name(&format!("{format_type}[]")), format!("_{client_name}"));
        }
    }

    #[test]
    fn odd_input_does_not_panic() {
        for odd in ["", "(", ")", "[", "\"", "\"unclosed", "a.", ".", "numeric(10", "x[", "\"a\"\"", "((a)"] {
            let _ = supabase_type_name(odd);
        }
        assert_eq!(supabase_type_name("numeric(10"), "numeric");
        assert_eq!(supabase_type_name(""), "");
    }
}
