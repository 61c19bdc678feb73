//! Roles and rules: which synced tables a token's role may read and write, which of their rows
//! (a column equal to a claim of the token), and which columns it never sees. Pure code: the
//! `[[rules]]` configuration, its validation, resolution per identity, and the checks and
//! filters that sessions and the merge apply with the result.
//!
//! The most specific rule wins: (table, role) > (table, "*") > ("*", role) > ("*", "*").
//! Without any rule everyone reads and writes everything; with rules, a (table, role) that no
//! rule matches has no access.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use protocol::{Change, Delta, Object, Op};
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Identity;
use crate::error::{Error, Result};
use crate::storage::catalog::{Catalog, TableSchema};

/// Matches every table or every role.
pub const ANY: &str = "*";
/// Claim a row restriction compares with when `row_claim` is not set.
pub const DEFAULT_ROW_CLAIM: &str = "sub";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    None,
    Read,
    ReadWrite,
}

/// One `[[rules]]` entry of the configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// A synced table's name as the hub knows it (`products`, `app.orders`), or `"*"`.
    pub table: String,
    /// A role name from the token's role claim, or `"*"`.
    pub role: String,
    pub access: Access,
    /// Only rows whose column equals the claim's value (compared as text).
    #[serde(default)]
    pub row_column: Option<String>,
    /// Claim path (dots nest) whose value the row column must equal. Default `sub`.
    #[serde(default)]
    pub row_claim: Option<String>,
    /// Columns never sent to this role, which it may not write either.
    #[serde(default)]
    pub hidden_columns: Vec<String>,
}

/// A validated rule.
#[derive(Debug)]
struct Rule {
    access: Access,
    /// (column, claim path split at dots).
    row: Option<(String, Vec<String>)>,
    hidden: Vec<String>,
}

impl Rule {
    fn unrestricted(&self) -> bool {
        self.access == Access::ReadWrite && self.row.is_none() && self.hidden.is_empty()
    }
}

/// All rules, by (table, role).
#[derive(Debug, Default)]
pub struct Rules {
    by_table_role: HashMap<(String, String), Arc<Rule>>,
}

fn config(message: String) -> Error {
    Error::Config(message)
}

impl Rules {
    pub fn from_config(rules: &[RuleConfig]) -> Result<Rules> {
        let mut by_table_role = HashMap::new();
        for (n, r) in rules.iter().enumerate() {
            let at = format!("rules[{n}] (table `{}`, role `{}`)", r.table, r.role);
            if r.table.trim().is_empty() || r.role.trim().is_empty() {
                return Err(config(format!("{at}: table and role must be named (\"*\" for any)")));
            }
            if r.row_claim.is_some() && r.row_column.is_none() {
                return Err(config(format!("{at}: row_claim needs a row_column")));
            }
            if r.access == Access::None && (r.row_column.is_some() || !r.hidden_columns.is_empty()) {
                return Err(config(format!("{at}: access \"none\" takes no row_column or hidden_columns")));
            }
            let row = match &r.row_column {
                None => None,
                Some(column) if column.is_empty() => return Err(config(format!("{at}: row_column is empty"))),
                Some(column) => {
                    let claim = r.row_claim.as_deref().unwrap_or(DEFAULT_ROW_CLAIM);
                    let path: Vec<String> = claim.split('.').map(str::to_owned).collect();
                    if path.iter().any(String::is_empty) {
                        return Err(config(format!("{at}: row_claim `{claim}` is not a claim path (names joined by dots)")));
                    }
                    if r.hidden_columns.contains(column) {
                        return Err(config(format!("{at}: row_column `{column}` may not be hidden (rows could not be written)")));
                    }
                    Some((column.clone(), path))
                }
            };
            let mut seen = HashSet::new();
            for column in &r.hidden_columns {
                if column.is_empty() || !seen.insert(column.as_str()) {
                    return Err(config(format!("{at}: hidden column `{column}` is empty or named twice")));
                }
            }
            let rule = Rule { access: r.access, row, hidden: r.hidden_columns.clone() };
            if by_table_role.insert((r.table.clone(), r.role.clone()), Arc::new(rule)).is_some() {
                return Err(config(format!("{at}: a second rule for the same table and role")));
            }
        }
        Ok(Rules { by_table_role })
    }

    /// What the rules name that the synced tables lack (a misspelt table silently denies, a
    /// missing row column hides every row), and hidden key columns (which stay visible): one
    /// sentence each, for the start-up log.
    pub fn problems_with(&self, catalog: &Catalog) -> Vec<String> {
        let mut problems = Vec::new();
        let mut entries: Vec<_> = self.by_table_role.iter().collect();
        entries.sort_by(|a, b| a.0.cmp(b.0));
        for ((table, role), rule) in entries {
            let schemas: Vec<&TableSchema> = if table == ANY {
                catalog.names().filter_map(|n| catalog.get(n)).map(|t| &**t).collect()
            } else {
                match catalog.get(table) {
                    Some(t) => vec![&**t],
                    None => {
                        problems.push(format!("rule for table `{table}`, role `{role}`: `{table}` is not a synced table"));
                        continue;
                    }
                }
            };
            for schema in schemas {
                if let Some((column, _)) = &rule.row {
                    if !schema.columns.contains_key(column) {
                        problems.push(format!("rule for `{table}`, role `{role}`: `{}` has no row column `{column}`", schema.name));
                    }
                }
                for column in rule.hidden.iter().filter(|c| schema.key.contains(c)) {
                    problems.push(format!("rule for `{table}`, role `{role}`: `{column}` is a key column of `{}` and stays visible", schema.name));
                }
            }
        }
        problems
    }

    /// No rules: nobody is restricted.
    pub fn is_empty(&self) -> bool {
        self.by_table_role.is_empty()
    }

    /// What `identity` may do, with the claim values its row restrictions compare with already
    /// read from the token; `None` when it may read and write everything (sessions then share
    /// encoded frames).
    pub fn view_for(&self, identity: &Identity) -> Option<Arc<AccessView>> {
        if self.is_empty() {
            return None;
        }
        let role = &*identity.role;
        let resolve = |rule: &Arc<Rule>| Resolved {
            claim: rule.row.as_ref().and_then(|(_, path)| claim_text(&identity.claims, path)),
            rule: rule.clone(),
        };
        let mut tables: HashMap<String, Resolved> = HashMap::new();
        for ((table, rule_role), rule) in &self.by_table_role {
            if table == ANY || (rule_role != role && rule_role != ANY) {
                continue;
            }
            // (table, role) beats (table, "*").
            if rule_role == ANY && tables.contains_key(table) {
                continue;
            }
            tables.insert(table.clone(), resolve(rule));
        }
        let fallback = self
            .by_table_role
            .get(&(ANY.to_owned(), role.to_owned()))
            .or_else(|| self.by_table_role.get(&(ANY.to_owned(), ANY.to_owned())))
            .map(resolve);
        let unrestricted =
            tables.values().all(|r| r.rule.unrestricted()) && fallback.as_ref().is_some_and(|r| r.rule.unrestricted());
        if unrestricted {
            return None;
        }
        Some(Arc::new(AccessView { role: identity.role.clone(), tables, fallback }))
    }
}

/// A claim's value as text: a string as is, a number or boolean by its JSON text.
fn claim_text(claims: &Value, path: &[String]) -> Option<String> {
    let mut value = claims;
    for part in path {
        value = value.get(part)?;
    }
    value_text(value).map(Cow::into_owned)
}

/// How a row restriction reads a value: a JSON string as is, a number or boolean by its JSON
/// text (what Postgres's `->>` gives); null, arrays and objects match nothing.
fn value_text(value: &Value) -> Option<Cow<'_, str>> {
    match value {
        Value::String(s) => Some(Cow::Borrowed(s)),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

#[derive(Debug, Clone)]
struct Resolved {
    rule: Arc<Rule>,
    /// The token's value of the rule's row claim; `None` when the token lacks it.
    claim: Option<String>,
}

/// What one identity may do, table by table.
#[derive(Debug)]
pub struct AccessView {
    role: Arc<str>,
    /// Rules naming a table, for this role or any role.
    tables: HashMap<String, Resolved>,
    /// ("*", role) or ("*", "*").
    fallback: Option<Resolved>,
}

impl AccessView {
    fn rule(&self, table: &str) -> Option<&Resolved> {
        self.tables.get(table).or(self.fallback.as_ref())
    }

    /// The table's access; a row restriction whose claim the token lacks gives none.
    fn access(&self, table: &str) -> Access {
        match self.rule(table) {
            Some(r) if r.rule.row.is_some() && r.claim.is_none() => Access::None,
            Some(r) => r.rule.access,
            None => Access::None,
        }
    }

    pub fn can_read(&self, table: &str) -> bool {
        self.access(table) >= Access::Read
    }

    pub fn can_write(&self, table: &str) -> bool {
        self.access(table) == Access::ReadWrite
    }

    /// (column, value): only rows whose column, read as text, equals the value.
    pub fn row_restriction(&self, table: &str) -> Option<(&str, &str)> {
        let r = self.rule(table)?;
        let (column, _) = r.rule.row.as_ref()?;
        Some((column.as_str(), r.claim.as_deref()?))
    }

    pub fn hidden_columns(&self, table: &str) -> &[String] {
        self.rule(table).map_or(&[], |r| &r.rule.hidden)
    }

    /// Whether a row image (a column missing reads as null) is inside the row restriction.
    fn row_inside(&self, table: &str, column_value: Option<&Value>) -> bool {
        match self.row_restriction(table) {
            None => true,
            Some((_, claim)) => column_value.and_then(value_text).is_some_and(|v| v == claim),
        }
    }

    /// The delta as this identity may see it: `None` when the table is unreadable, or when
    /// neither the new row nor the old image (the new row with `old` laid over it) is inside
    /// the row restriction; a row that moved out comes as a delete with the old image; hidden
    /// columns are stripped from `row` and `old`. An update that changed hidden columns only
    /// is left out.
    pub fn visible_delta<'d>(&self, delta: &'d Delta) -> Option<Cow<'d, Delta>> {
        let table = delta.table.as_str();
        if !self.can_read(table) {
            return None;
        }
        let hidden = self.hidden_columns(table);
        let (new_inside, old_inside) = match self.row_restriction(table) {
            None => (true, true),
            Some((column, _)) => {
                let new_value = delta.row.as_ref().and_then(|r| r.get(column));
                let old_value = delta.old.as_ref().and_then(|o| o.get(column)).or(new_value);
                (delta.row.is_some() && self.row_inside(table, new_value), self.row_inside(table, old_value))
            }
        };
        if delta.op == Op::Upsert && !new_inside {
            if !old_inside {
                return None;
            }
            // Moved out: the device removes the row it had.
            let mut old = crate::sync::views::previous_image(delta).unwrap_or_default();
            self.strip_hidden(table, &mut old);
            return Some(Cow::Owned(Delta { op: Op::Delete, row: None, old: Some(old), left: true, ..delta.clone() }));
        }
        if delta.op == Op::Delete && !old_inside {
            return None;
        }
        let touches_hidden = |o: &Option<Object>| o.as_ref().is_some_and(|o| hidden.iter().any(|c| o.contains_key(c)));
        if !touches_hidden(&delta.row) && !touches_hidden(&delta.old) {
            return Some(Cow::Borrowed(delta));
        }
        let mut visible = delta.clone();
        if let Some(row) = visible.row.as_mut() {
            self.strip_hidden(table, row);
        }
        if let Some(old) = visible.old.as_mut() {
            let had_changes = !old.is_empty();
            self.strip_hidden(table, old);
            if delta.op == Op::Upsert && delta.old.is_some() && had_changes && old.is_empty() && old_inside {
                return None; // an update of hidden columns only: nothing this role sees changed
            }
        }
        Some(Cow::Owned(visible))
    }

    /// A current row (snapshot) as this identity may see it.
    pub fn visible_row(&self, table: &str, row: &Object) -> Option<Object> {
        if !self.row_visible(table, row) {
            return None;
        }
        let mut row = row.clone();
        self.strip_hidden(table, &mut row);
        Some(row)
    }

    /// Whether a current row may be read: the table is readable and the row is inside the row
    /// restriction (e.g. a subscription snapshot's `keep`; strip with [`Self::strip_hidden`]).
    pub fn row_visible(&self, table: &str, row: &Object) -> bool {
        self.can_read(table) && self.row_restriction(table).is_none_or(|(column, _)| self.row_inside(table, row.get(column)))
    }

    /// Remove the columns hidden from this identity.
    pub fn strip_hidden(&self, table: &str, row: &mut Object) {
        for column in self.hidden_columns(table) {
            row.remove(column);
        }
    }

    /// The checks of a write that need no row: the table is writable and no hidden column is
    /// written.
    pub fn check_columns(&self, change: &Change) -> Result<(), String> {
        let table = change.table.as_str();
        if !self.can_write(table) {
            return Err(match self.rule(table) {
                Some(r) if r.rule.access == Access::ReadWrite => {
                    format!("role `{}` may not write `{table}`: the token lacks the claim its rows are restricted to", self.role)
                }
                _ => format!("role `{}` may not write `{table}`", self.role),
            });
        }
        if let Some(column) = self.hidden_columns(table).iter().find(|c| change.fields.contains_key(*c)) {
            return Err(format!("column `{column}` of `{table}` is hidden from role `{}` and may not be written", self.role));
        }
        Ok(())
    }

    /// The checks of a write against the row's current values (`None`: no row): an existing
    /// row must be inside the row restriction, and so must the row after the change (the
    /// current row with the change's key and fields laid over it).
    pub fn check_row(&self, change: &Change, current: Option<&Object>) -> Result<(), String> {
        let table = change.table.as_str();
        let Some((column, claim)) = self.row_restriction(table) else { return Ok(()) };
        if let Some(current) = current {
            if !self.row_inside(table, current.get(column)) {
                return Err(format!("the row's `{column}` is not yours: role `{}` may change only rows whose `{column}` is `{claim}`", self.role));
            }
        }
        if change.op == Op::Upsert {
            let after = change.fields.get(column).or_else(|| change.key.get(column)).or_else(|| current.and_then(|c| c.get(column)));
            if !self.row_inside(table, after) {
                return Err(format!("`{column}` must be `{claim}` for role `{}`", self.role));
            }
        }
        Ok(())
    }

    /// Every check of a write.
    pub fn check_write(&self, change: &Change, current: Option<&Object>) -> Result<(), String> {
        self.check_columns(change)?;
        self.check_row(change, current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{TenantId, UserId};
    use proptest::prelude::*;
    use protocol::Hlc;
    use serde_json::json;

    fn rule(table: &str, role: &str, access: Access) -> RuleConfig {
        RuleConfig { table: table.into(), role: role.into(), access, row_column: None, row_claim: None, hidden_columns: vec![] }
    }

    fn identity(role: &str, claims: Value) -> Identity {
        Identity {
            tenant: TenantId::new("t"),
            user: UserId::new("u"),
            role: role.into(),
            device: None,
            expires_at: 0,
            claims: Arc::new(claims),
        }
    }

    fn obj(v: Value) -> Object {
        v.as_object().unwrap().clone()
    }

    /// The field-service example: employees see and write only their work orders and never
    /// the cost; the price list is read-only; managers do everything.
    fn field_service() -> Rules {
        Rules::from_config(&[
            RuleConfig {
                row_column: Some("employee_id".into()),
                hidden_columns: vec!["cost_cents".into()],
                ..rule("work_orders", "Employee", Access::ReadWrite)
            },
            rule("price_list", "*", Access::Read),
            rule("*", "Manager", Access::ReadWrite),
            rule("*", "Employee", Access::Read),
        ])
        .unwrap()
    }

    fn employee() -> Arc<AccessView> {
        field_service().view_for(&identity("Employee", json!({"sub": "emp-1"}))).unwrap()
    }

    fn change(table: &str, op: Op, key: Value, fields: Value) -> Change {
        Change {
            change_id: uuid::Uuid::nil(),
            device_seq: 1,
            table: table.into(),
            op,
            key: obj(key),
            fields: obj(fields),
            hlc: Hlc { wall_ms: 1, counter: 0 },
            base_version: 0,
        }
    }

    fn delta(op: Op, row: Option<Value>, old: Option<Value>) -> Delta {
        Delta {
            seq: 7,
            table: "work_orders".into(),
            op,
            key: obj(json!({"id": 1})),
            row: row.map(obj),
            old: old.map(obj),
            origin: None,
            change_id: None,
            left: false,
        }
    }

    #[test]
    fn most_specific_rule_wins() {
        let rules = Rules::from_config(&[
            rule("orders", "Employee", Access::ReadWrite),
            rule("orders", "*", Access::None),
            rule("*", "Employee", Access::Read),
            rule("*", "*", Access::ReadWrite),
            rule("prices", "*", Access::Read),
        ])
        .unwrap();
        let emp = rules.view_for(&identity("Employee", json!({}))).unwrap();
        assert!(emp.can_write("orders")); // (table, role)
        assert!(emp.can_read("prices") && !emp.can_write("prices")); // (table, "*")
        assert!(emp.can_read("customers") && !emp.can_write("customers")); // ("*", role)
        let clerk = rules.view_for(&identity("Clerk", json!({}))).unwrap();
        assert!(!clerk.can_read("orders")); // (table, "*") beats ("*", "*")
        assert!(clerk.can_write("customers")); // ("*", "*")
    }

    #[test]
    fn deny_by_default_and_fast_path() {
        // No rules at all: unrestricted.
        assert!(Rules::from_config(&[]).unwrap().view_for(&identity("Anyone", json!({}))).is_none());
        let rules = field_service();
        // Rules present, none for this role: nothing.
        let guest = rules.view_for(&identity("Guest", json!({}))).unwrap();
        assert!(!guest.can_read("work_orders") && !guest.can_read("customers"));
        // The manager is restricted on the price list ((table, "*") applies to every role).
        let manager = rules.view_for(&identity("Manager", json!({}))).unwrap();
        assert!(manager.can_write("work_orders") && !manager.can_write("price_list"));
        // A role whose every rule is full access shares frames.
        let open = Rules::from_config(&[rule("*", "Manager", Access::ReadWrite), rule("*", "Employee", Access::Read)]).unwrap();
        assert!(open.view_for(&identity("Manager", json!({}))).is_none());
        assert!(open.view_for(&identity("Employee", json!({}))).is_some());
    }

    #[test]
    fn invalid_rules_are_config_errors() {
        let cases = [
            vec![rule("", "Employee", Access::Read)],
            vec![RuleConfig { row_claim: Some("sub".into()), ..rule("t", "r", Access::Read) }],
            vec![RuleConfig { row_column: Some("c".into()), row_claim: Some("a..b".into()), ..rule("t", "r", Access::Read) }],
            vec![RuleConfig { row_column: Some("c".into()), hidden_columns: vec!["c".into()], ..rule("t", "r", Access::Read) }],
            vec![RuleConfig { hidden_columns: vec!["x".into(), "x".into()], ..rule("t", "r", Access::Read) }],
            vec![RuleConfig { row_column: Some("c".into()), ..rule("t", "r", Access::None) }],
            vec![rule("t", "r", Access::Read), rule("t", "r", Access::None)],
        ];
        for case in cases {
            let err = Rules::from_config(&case).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{case:?}");
        }
        let parsed: RuleConfig = toml::from_str(
            "table = \"work_orders\"\nrole = \"Employee\"\naccess = \"read_write\"\nrow_column = \"employee_id\"\nrow_claim = \"app.emp\"",
        )
        .unwrap();
        assert_eq!(parsed.access, Access::ReadWrite);
        assert!(toml::from_str::<RuleConfig>("table = \"t\"\nrole = \"r\"\naccess = \"write\"").is_err());
    }

    #[test]
    fn claim_paths_nest_and_numbers_compare_as_text() {
        let rules = Rules::from_config(&[RuleConfig {
            row_column: Some("store_id".into()),
            row_claim: Some("app_metadata.store".into()),
            ..rule("orders", "*", Access::ReadWrite)
        }])
        .unwrap();
        let view = rules.view_for(&identity("Employee", json!({"app_metadata": {"store": 12}}))).unwrap();
        assert_eq!(view.row_restriction("orders"), Some(("store_id", "12")));
        assert!(view.visible_row("orders", &obj(json!({"store_id": 12, "x": 1}))).is_some());
        assert!(view.visible_row("orders", &obj(json!({"store_id": "12"}))).is_some());
        assert!(view.visible_row("orders", &obj(json!({"store_id": 13}))).is_none());
        assert!(view.visible_row("orders", &obj(json!({"x": 1}))).is_none());
        assert!(view.row_visible("orders", &obj(json!({"store_id": 12}))) && !view.row_visible("orders", &obj(json!({}))));
        // A token without the claim reads and writes nothing of the table.
        let bare = rules.view_for(&identity("Employee", json!({}))).unwrap();
        assert!(!bare.can_read("orders"));
        assert!(bare.check_columns(&change("orders", Op::Upsert, json!({"id": 1}), json!({}))).unwrap_err().contains("claim"));
    }

    #[test]
    fn visible_delta_filters_moves_out_and_strips_hidden() {
        let emp = employee();
        // Mine: kept, cost stripped from row and old.
        let mine = delta(Op::Upsert, Some(json!({"id": 1, "employee_id": "emp-1", "title": "b", "cost_cents": 9})), Some(json!({"title": "a", "cost_cents": 8})));
        let seen = emp.visible_delta(&mine).unwrap();
        assert_eq!(seen.row.as_ref().unwrap(), &obj(json!({"id": 1, "employee_id": "emp-1", "title": "b"})));
        assert_eq!(seen.old.as_ref().unwrap(), &obj(json!({"title": "a"})));
        // Someone else's: left out.
        let theirs = delta(Op::Upsert, Some(json!({"id": 1, "employee_id": "emp-2", "title": "b"})), Some(json!({"title": "a"})));
        assert!(emp.visible_delta(&theirs).is_none());
        // Moved from me to someone else: a delete with the old image.
        let moved = delta(Op::Upsert, Some(json!({"id": 1, "employee_id": "emp-2", "title": "b", "cost_cents": 1})), Some(json!({"employee_id": "emp-1"})));
        let seen = emp.visible_delta(&moved).unwrap();
        assert_eq!((seen.op, seen.left), (Op::Delete, true), "moved out: a delete that says the row left");
        assert!(seen.row.is_none());
        assert_eq!(seen.old.as_ref().unwrap(), &obj(json!({"id": 1, "employee_id": "emp-1", "title": "b"})));
        assert_eq!(seen.seq, 7);
        // Moved to me: an upsert.
        let moved_in = delta(Op::Upsert, Some(json!({"id": 1, "employee_id": "emp-1"})), Some(json!({"employee_id": "emp-2"})));
        assert_eq!(emp.visible_delta(&moved_in).unwrap().op, Op::Upsert);
        // Deletes: mine kept, theirs left out.
        let del_mine = delta(Op::Delete, None, Some(json!({"id": 1, "employee_id": "emp-1", "cost_cents": 3})));
        assert_eq!(emp.visible_delta(&del_mine).unwrap().old.as_ref().unwrap(), &obj(json!({"id": 1, "employee_id": "emp-1"})));
        assert!(emp.visible_delta(&delta(Op::Delete, None, Some(json!({"employee_id": "emp-2"})))).is_none());
        // Only the cost changed: nothing to see.
        let cost_only = delta(Op::Upsert, Some(json!({"id": 1, "employee_id": "emp-1", "cost_cents": 9})), Some(json!({"cost_cents": 8})));
        assert!(emp.visible_delta(&cost_only).is_none());
        // Unreadable table: left out; readable without restriction: borrowed as is.
        let guest = field_service().view_for(&identity("Guest", json!({}))).unwrap();
        assert!(guest.visible_delta(&mine).is_none());
        let other = Delta { table: "customers".into(), ..mine.clone() };
        assert!(matches!(emp.visible_delta(&other), Some(Cow::Borrowed(_))));
    }

    #[test]
    fn check_write_each_rule() {
        let emp = employee();
        let mine = obj(json!({"id": 1, "employee_id": "emp-1", "title": "a"}));
        let theirs = obj(json!({"id": 2, "employee_id": "emp-2", "title": "a"}));
        let update = |fields: Value| change("work_orders", Op::Upsert, json!({"id": 1}), fields);
        assert!(emp.check_write(&update(json!({"title": "b"})), Some(&mine)).is_ok());
        assert!(emp.check_write(&update(json!({"title": "b"})), Some(&theirs)).unwrap_err().contains("not yours"));
        assert!(emp.check_write(&update(json!({"employee_id": "emp-2"})), Some(&mine)).unwrap_err().contains("must be `emp-1`"));
        assert!(emp.check_write(&update(json!({"cost_cents": 1})), Some(&mine)).unwrap_err().contains("hidden"));
        // Inserts must set the column to the claim.
        assert!(emp.check_write(&update(json!({"employee_id": "emp-1", "title": "n"})), None).is_ok());
        assert!(emp.check_write(&update(json!({"employee_id": "emp-2"})), None).is_err());
        assert!(emp.check_write(&update(json!({"title": "n"})), None).is_err());
        // Deletes: only of own rows.
        let del = change("work_orders", Op::Delete, json!({"id": 1}), json!({}));
        assert!(emp.check_write(&del, Some(&mine)).is_ok());
        assert!(emp.check_write(&del, Some(&theirs)).is_err());
        // Read-only and unknown tables.
        let price = change("price_list", Op::Upsert, json!({"id": 1}), json!({"price_cents": 1}));
        assert!(emp.check_write(&price, None).unwrap_err().contains("may not write `price_list`"));
        assert!(emp.check_write(&change("customers", Op::Upsert, json!({"id": 1}), json!({})), None).is_err());
    }

    proptest! {
        /// Whatever the delta, what comes out never carries a hidden column nor shows a row of
        /// someone else, and a delta comes out unchanged when it has nothing to hide.
        #[test]
        fn visible_delta_never_leaks(
            new_owner in prop::option::of(prop::sample::select(vec!["emp-1", "emp-2"])),
            old_owner in prop::option::of(prop::sample::select(vec!["emp-1", "emp-2"])),
            cost_in_row: bool,
            cost_in_old: bool,
            delete: bool,
        ) {
            let emp = employee();
            let mut row = json!({"id": 1, "title": "t"});
            if let Some(o) = new_owner { row["employee_id"] = json!(o); }
            if cost_in_row { row["cost_cents"] = json!(5); }
            let mut old = json!({});
            if let Some(o) = old_owner { old["employee_id"] = json!(o); }
            if cost_in_old { old["cost_cents"] = json!(4); }
            let d = if delete {
                delta(Op::Delete, None, Some(old))
            } else {
                delta(Op::Upsert, Some(row), Some(old))
            };
            let old_image_owner = if delete { old_owner } else { old_owner.or(new_owner) };
            let mine = Some("emp-1");
            let hidden_only = old_owner.is_none() && cost_in_old;
            let expect_none = if delete {
                old_image_owner != mine
            } else {
                (new_owner != mine && old_image_owner != mine) || (new_owner == mine && hidden_only)
            };
            match emp.visible_delta(&d) {
                None => prop_assert!(expect_none),
                Some(seen) => {
                    prop_assert!(!expect_none);
                    for image in seen.row.iter().chain(seen.old.iter()) {
                        prop_assert!(!image.contains_key("cost_cents"));
                    }
                    match seen.op {
                        Op::Upsert => prop_assert_eq!(seen.row.as_ref().and_then(|r| r.get("employee_id")), Some(&json!("emp-1"))),
                        Op::Delete => prop_assert_eq!(old_image_owner, Some("emp-1")),
                    }
                    if !cost_in_row && !cost_in_old && seen.op == d.op {
                        prop_assert_eq!(&*seen, &d);
                    }
                }
            }
        }
    }
}
