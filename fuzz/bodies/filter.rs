//! What must hold for any subscription filter applied to any row: no panic, and the laws the
//! spec gives the operators (protocol/README.md §13.1): `neq` is not `eq`, `in` is `eq` with
//! one of the options, two numbers or two strings are exactly one of less, equal or greater
//! (`lte` is `lt` or `eq`, and `x lt y` is `y gt x`), other pairs are never ordered, and
//! `filter::check` refuses exactly the conditions the spec says cannot be evaluated or stored.

// Each includer uses a part: the fuzz targets leave out the seeds.
#![allow(dead_code)]

use protocol::codec::{self, Encoding};
use protocol::filter::{check, holds, matches};
use protocol::{ClientFrame, Condition, FilterOp, Object};
use serde_json::Value;

use super::draw::Draw;

const OPS: [FilterOp; 7] = [FilterOp::Eq, FilterOp::Neq, FilterOp::Lt, FilterOp::Lte, FilterOp::Gt, FilterOp::Gte, FilterOp::In];
const COLUMNS: &[&str] = &["a", "b", "c"];

/// Body of the `filter` target. Input that decodes as a `subscribe` frame (as the golden
/// vectors do) gives the conditions, and rows are built from their own values; any other input
/// draws conditions and rows from its bytes.
pub fn filter(bytes: &[u8]) {
    let subscribed = [Encoding::Json, Encoding::MsgPack].into_iter().find_map(|encoding| match codec::decode_client(encoding, bytes) {
        Ok(ClientFrame::Subscribe { filter, .. }) if !filter.is_empty() => Some(filter),
        _ => None,
    });
    match subscribed {
        Some(conditions) => {
            let mut values: Vec<Value> = vec![Value::Null];
            for condition in &conditions {
                values.push(condition.value.clone());
                values.extend(condition.value.as_array().into_iter().flatten().cloned());
            }
            for (n, condition) in conditions.iter().enumerate() {
                for value in &values {
                    let mut row = Object::new();
                    row.insert(condition.column.clone(), value.clone());
                    check_laws(&conditions, &row);
                    check_laws(&conditions[n..=n], &row);
                }
            }
            check_laws(&conditions, &Object::new());
        }
        None => {
            let mut draw = Draw::new(bytes);
            let conditions: Vec<Condition> = (0..draw.below(4))
                .map(|_| Condition { column: draw.pick(COLUMNS).to_string(), op: *draw.pick(&OPS), value: draw.value(2) })
                .collect();
            let row = draw.object(2, COLUMNS);
            check_laws(&conditions, &row);
        }
    }
}

fn check_laws(conditions: &[Condition], row: &Object) {
    let each = conditions.iter().all(|c| holds(c, row.get(&c.column).unwrap_or(&Value::Null)));
    assert_eq!(matches(conditions, row), each, "a row matches when every condition holds: {conditions:?} on {row:?}");
    for condition in conditions {
        let value = row.get(&condition.column).unwrap_or(&Value::Null);
        check_pair(value, &condition.value);
        check_pair(&condition.value, value);
        let checkable = !nul_inside(&condition.value)
            && match condition.op {
                FilterOp::Eq | FilterOp::Neq => true,
                FilterOp::In => condition.value.is_array(),
                _ => condition.value.is_number() || condition.value.is_string(),
            };
        assert_eq!(check(condition).is_ok(), checkable, "check of {condition:?}");
    }
}

/// The operators' laws for `column op expected`.
fn check_pair(column: &Value, expected: &Value) {
    let op = |op: FilterOp, value: &Value| holds(&Condition { column: "c".into(), op, value: value.clone() }, column);
    let swapped = |op: FilterOp| holds(&Condition { column: "c".into(), op, value: column.clone() }, expected);
    let (eq, lt, gt) = (op(FilterOp::Eq, expected), op(FilterOp::Lt, expected), op(FilterOp::Gt, expected));
    let context = format!("{column:?} against {expected:?}");
    assert_eq!(op(FilterOp::Neq, expected), !eq, "neq is not eq: {context}");
    assert_eq!(swapped(FilterOp::Eq), eq, "eq is symmetric: {context}");
    assert_eq!(swapped(FilterOp::Gt), lt, "lt is the mirror of gt: {context}");
    assert_eq!(swapped(FilterOp::Lt), gt, "gt is the mirror of lt: {context}");
    assert_eq!(op(FilterOp::Lte, expected), lt || (eq && ordered(column, expected)), "lte: {context}");
    assert_eq!(op(FilterOp::Gte, expected), gt || (eq && ordered(column, expected)), "gte: {context}");
    if ordered(column, expected) {
        assert_eq!([lt, eq, gt].iter().filter(|holds| **holds).count(), 1, "exactly one of lt, eq, gt: {context}");
    } else {
        assert!(!lt && !gt, "only numbers and strings are ordered: {context}");
        if std::mem::discriminant(column) != std::mem::discriminant(expected) {
            assert!(!eq, "values of different types are never equal: {context}");
        }
    }
    let in_options = Value::Array(vec![Value::Bool(false), expected.clone()]);
    assert_eq!(op(FilterOp::In, &in_options), eq || *column == Value::Bool(false), "in: {context}");
    assert!(!op(FilterOp::In, expected) || expected.as_array().is_some_and(|o| o.iter().any(|o| op(FilterOp::Eq, o))), "in: {context}");
}

/// Whether U+0000 is anywhere in a value, keys included: no stored value holds it, so a filter
/// with it is refused.
fn nul_inside(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(nul_inside),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || nul_inside(v)),
        _ => false,
    }
}

fn ordered(a: &Value, b: &Value) -> bool {
    (a.is_number() && b.is_number()) || (a.is_string() && b.is_string())
}
