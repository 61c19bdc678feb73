//! What a table subscription sees of a committed change: the change itself when the new row
//! matches the filter, a delete when the row matched before and no longer does, else nothing.
//! Pure code, unit-tested here.

use std::borrow::Cow;

use protocol::{Condition, Delta, Object, Op};

/// The row as it was before `delta`: the new row with the old values of the changed columns
/// laid over it, or the whole old row of a delete. `None` for an insert.
pub fn previous_image(delta: &Delta) -> Option<Object> {
    match delta.op {
        Op::Delete => delta.old.clone(),
        Op::Upsert => {
            let (row, old) = (delta.row.as_ref()?, delta.old.as_ref()?);
            let mut image = row.clone();
            image.extend(old.iter().map(|(k, v)| (k.clone(), v.clone())));
            Some(image)
        }
    }
}

/// `delta` as a subscription to `table` with `filter` receives it, if at all.
pub fn subscription_view<'a>(table: &str, filter: &[Condition], delta: &'a Delta) -> Option<Cow<'a, Delta>> {
    if delta.table != table {
        return None;
    }
    if delta.row.as_ref().is_some_and(|row| protocol::filter::matches(filter, row)) {
        return Some(Cow::Borrowed(delta));
    }
    let before = previous_image(delta).filter(|image| protocol::filter::matches(filter, image))?;
    if delta.op == Op::Delete {
        return Some(Cow::Borrowed(delta));
    }
    // The row left the subscription: the subscriber drops it.
    Some(Cow::Owned(Delta {
        seq: delta.seq,
        table: delta.table.clone(),
        op: Op::Delete,
        key: delta.key.clone(),
        row: None,
        old: Some(before),
        origin: delta.origin.clone(),
        change_id: delta.change_id,
        left: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::FilterOp;
    use serde_json::{json, Value};

    fn obj(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    fn delta(op: Op, row: Option<Value>, old: Option<Value>) -> Delta {
        Delta {
            seq: 9,
            table: "products".into(),
            op,
            key: obj(json!({"id": 1})),
            row: row.map(obj),
            old: old.map(obj),
            origin: Some("pos-1".into()),
            change_id: None,
            left: false,
        }
    }

    fn low_stock() -> Vec<Condition> {
        vec![Condition { column: "stock".into(), op: FilterOp::Lt, value: json!(10) }]
    }

    #[test]
    fn rows_entering_staying_leaving_and_never_matching() {
        let filter = low_stock();
        let insert = delta(Op::Upsert, Some(json!({"id": 1, "stock": 3})), None);
        assert!(matches!(subscription_view("products", &filter, &insert), Some(Cow::Borrowed(_))));

        let enters = delta(Op::Upsert, Some(json!({"id": 1, "stock": 9})), Some(json!({"stock": 10})));
        assert_eq!(subscription_view("products", &filter, &enters).unwrap().op, Op::Upsert);

        let leaves = delta(Op::Upsert, Some(json!({"id": 1, "stock": 12})), Some(json!({"stock": 4})));
        let seen = subscription_view("products", &filter, &leaves).unwrap();
        assert_eq!((seen.op, seen.left), (Op::Delete, true), "a delete that says the row left the filter");
        assert_eq!(seen.row, None);
        assert_eq!(seen.old, Some(obj(json!({"id": 1, "stock": 4}))));
        assert_eq!((seen.seq, &seen.key), (9, &leaves.key));

        let never = delta(Op::Upsert, Some(json!({"id": 1, "stock": 40, "name": "x"})), Some(json!({"name": "y"})));
        assert!(subscription_view("products", &filter, &never).is_none());

        let deleted = delta(Op::Delete, None, Some(json!({"id": 1, "stock": 2})));
        assert!(matches!(subscription_view("products", &filter, &deleted), Some(Cow::Borrowed(d)) if !d.left), "a real delete");
        let deleted_elsewhere = delta(Op::Delete, None, Some(json!({"id": 1, "stock": 20})));
        assert!(subscription_view("products", &filter, &deleted_elsewhere).is_none());

        assert!(subscription_view("orders", &filter, &insert).is_none());
        assert!(subscription_view("products", &[], &never).is_some(), "no filter: every change");
    }
}
