//! Subscription filters: the normative meaning of a `subscribe` frame's conditions, shared by
//! the hub (which evaluates them) and clients (which may evaluate them on cached rows).
//!
//! A row matches when every condition holds. A column the row lacks reads as `null`. Numbers
//! compare numerically (`1` equals `1.0`), strings by Unicode code point, booleans and `null`
//! only by equality; arrays and objects are equal when structurally equal. Values of different
//! JSON types are never equal and never ordered: `eq`, `lt`… are false, `neq` is true.

use std::cmp::Ordering;

use serde_json::Value;

use crate::{Condition, FilterOp, Object};

/// Whether `row` satisfies all `conditions`.
pub fn matches(conditions: &[Condition], row: &Object) -> bool {
    conditions.iter().all(|c| holds(c, row.get(&c.column).unwrap_or(&Value::Null)))
}

/// Whether one condition holds for a column's value.
pub fn holds(condition: &Condition, value: &Value) -> bool {
    let expected = &condition.value;
    match condition.op {
        FilterOp::Eq => equal(value, expected),
        FilterOp::Neq => !equal(value, expected),
        FilterOp::Lt => order(value, expected) == Some(Ordering::Less),
        FilterOp::Lte => matches!(order(value, expected), Some(Ordering::Less | Ordering::Equal)),
        FilterOp::Gt => order(value, expected) == Some(Ordering::Greater),
        FilterOp::Gte => matches!(order(value, expected), Some(Ordering::Greater | Ordering::Equal)),
        FilterOp::In => expected.as_array().is_some_and(|options| options.iter().any(|o| equal(value, o))),
    }
}

/// A condition that cannot be evaluated as written: `in` without an array, or an ordering
/// comparison with something other than a number or a string.
pub fn check(condition: &Condition) -> Result<(), String> {
    // No stored value holds U+0000 (Postgres text and jsonb cannot), and a snapshot sends the
    // value to Postgres, which would refuse it.
    if crate::holds_nul(&condition.value) {
        return Err(format!("the value for `{}` holds the character U+0000", condition.column));
    }
    match condition.op {
        FilterOp::In if !condition.value.is_array() => Err(format!("`in` on `{}` needs an array of values", condition.column)),
        FilterOp::Lt | FilterOp::Lte | FilterOp::Gt | FilterOp::Gte
            if !(condition.value.is_number() || condition.value.is_string()) =>
        {
            Err(format!("`{}` is compared with a number or a string only", condition.column))
        }
        _ => Ok(()),
    }
}

fn equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numeric(x, y) == Some(Ordering::Equal),
        _ => a == b,
    }
}

fn order(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => numeric(x, y),
        (Value::String(x), Value::String(y)) => Some(x.as_str().cmp(y.as_str())),
        _ => None,
    }
}

fn numeric(x: &serde_json::Number, y: &serde_json::Number) -> Option<Ordering> {
    // Exact for integers (f64 loses precision past 2^53), numeric otherwise.
    match (x.as_i64(), y.as_i64()) {
        (Some(a), Some(b)) => Some(a.cmp(&b)),
        _ => match (x.as_u64(), y.as_u64()) {
            (Some(a), Some(b)) => Some(a.cmp(&b)),
            _ => x.as_f64()?.partial_cmp(&y.as_f64()?),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn cond(column: &str, op: FilterOp, value: Value) -> Condition {
        Condition { column: column.into(), op, value }
    }

    fn row(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_value_holding_nul_is_refused() {
        assert!(check(&cond("name", FilterOp::Eq, json!("a\u{0}b"))).is_err());
        assert!(check(&cond("name", FilterOp::In, json!(["ok", "a\u{0}"]))).is_err());
        assert!(check(&cond("name", FilterOp::Eq, json!({"k\u{0}": 1}))).is_err());
        assert!(check(&cond("name", FilterOp::Eq, json!("ab"))).is_ok());
    }

    #[test]
    fn each_operator() {
        let r = row(json!({"stock": 7, "store": "s1", "price": 2.5, "active": true, "note": null}));
        let cases = [
            (cond("store", FilterOp::Eq, json!("s1")), true),
            (cond("store", FilterOp::Eq, json!("s2")), false),
            (cond("stock", FilterOp::Eq, json!(7.0)), true),
            (cond("store", FilterOp::Neq, json!("s2")), true),
            (cond("store", FilterOp::Neq, json!("s1")), false),
            (cond("stock", FilterOp::Lt, json!(10)), true),
            (cond("stock", FilterOp::Lt, json!(7)), false),
            (cond("stock", FilterOp::Lte, json!(7)), true),
            (cond("stock", FilterOp::Gt, json!(6.5)), true),
            (cond("stock", FilterOp::Gt, json!(7)), false),
            (cond("price", FilterOp::Gte, json!(2.5)), true),
            (cond("store", FilterOp::Lt, json!("s2")), true),
            (cond("store", FilterOp::In, json!(["s0", "s1"])), true),
            (cond("store", FilterOp::In, json!(["s0"])), false),
            (cond("active", FilterOp::Eq, json!(true)), true),
            (cond("note", FilterOp::Eq, json!(null)), true),
            (cond("missing", FilterOp::Eq, json!(null)), true),
            // Different types: never equal, never ordered.
            (cond("stock", FilterOp::Eq, json!("7")), false),
            (cond("stock", FilterOp::Neq, json!("7")), true),
            (cond("stock", FilterOp::Lt, json!("9")), false),
            (cond("note", FilterOp::Lt, json!(1)), false),
        ];
        for (c, expected) in cases {
            assert_eq!(matches(std::slice::from_ref(&c), &r), expected, "{c:?}");
        }
    }

    #[test]
    fn conditions_are_anded_and_checked() {
        let r = row(json!({"stock": 3, "store": "s1"}));
        let both = [cond("stock", FilterOp::Lt, json!(5)), cond("store", FilterOp::Eq, json!("s1"))];
        assert!(matches(&both, &r));
        let one_fails = [cond("stock", FilterOp::Lt, json!(5)), cond("store", FilterOp::Eq, json!("s2"))];
        assert!(!matches(&one_fails, &r));
        assert!(matches(&[], &r));
        assert!(check(&cond("store", FilterOp::In, json!("s1"))).is_err());
        assert!(check(&cond("store", FilterOp::Lt, json!(true))).is_err());
        assert!(check(&cond("store", FilterOp::In, json!(["s1"]))).is_ok());
    }

    proptest! {
        #[test]
        fn numeric_comparisons_agree_with_integers(a in -1000i64..1000, b in -1000i64..1000) {
            let r = row(json!({"n": a}));
            prop_assert_eq!(matches(&[cond("n", FilterOp::Lt, json!(b))], &r), a < b);
            prop_assert_eq!(matches(&[cond("n", FilterOp::Lte, json!(b))], &r), a <= b);
            prop_assert_eq!(matches(&[cond("n", FilterOp::Gt, json!(b))], &r), a > b);
            prop_assert_eq!(matches(&[cond("n", FilterOp::Gte, json!(b))], &r), a >= b);
            prop_assert_eq!(matches(&[cond("n", FilterOp::Eq, json!(b as f64))], &r), a == b);
            prop_assert_eq!(matches(&[cond("n", FilterOp::Neq, json!(b))], &r), a != b);
        }

        #[test]
        fn string_order_is_code_point_order(a in "\\PC{0,6}", b in "\\PC{0,6}") {
            let r = row(json!({"s": a.clone()}));
            prop_assert_eq!(matches(&[cond("s", FilterOp::Lt, json!(b.clone()))], &r), a.chars().lt(b.chars()));
        }
    }
}
