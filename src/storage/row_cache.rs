//! The rows a tenant's group commits last read and wrote, kept between groups so that the next
//! group need not read them back from Postgres.
//!
//! Every write to a synced row that is not the hub's own (another SQL client's, through the
//! capture trigger) moves the tenant's head in the same transaction. So while the head is
//! where this cache's last group left it, the cached rows, versions and clocks are the ones in
//! Postgres. A group that merges from the cache checks the head in its bookkeeping statement
//! and is redone from rows read under lock when it moved (see `storage::apply`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use protocol::Object;

use super::catalog::TableSchema;
use crate::ids::Seq;
use crate::sync::merge::RowState;

/// One row as a group left it, with the table description it was merged under: a reloaded
/// catalog (a column added, say) makes it miss.
pub(super) struct CachedRow {
    pub table: Arc<TableSchema>,
    /// The row's primary key as Postgres renders it.
    pub key: Object,
    pub state: RowState,
}

/// Rows held by every tenant's cache together, bounded (config `row_cache_total_rows`).
#[derive(Clone)]
pub struct RowBudget {
    held: Arc<AtomicUsize>,
    limit: usize,
}

impl RowBudget {
    pub fn new(limit: usize) -> RowBudget {
        RowBudget { held: Arc::new(AtomicUsize::new(0)), limit }
    }

    /// Rows held now, over all tenants.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Take up to `wanted` rows of what is left; returns how many were granted.
    fn reserve(&self, wanted: usize) -> usize {
        let mut granted = 0;
        // fetch_update retries on a race; the closure only computes.
        let _ = self.held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
            granted = wanted.min(self.limit.saturating_sub(held));
            Some(held + granted)
        });
        granted
    }

    fn release(&self, rows: usize) {
        if rows > 0 {
            self.held.fetch_sub(rows, Ordering::Relaxed);
        }
    }
}

/// Rows of one tenant, bounded in count, and counted against the hub's [`RowBudget`].
pub struct RowCache {
    /// Most rows held; 0 keeps none.
    limit: usize,
    budget: RowBudget,
    /// The tenant head as of which the rows are current; `None`: nothing is.
    head: Option<Seq>,
    /// By (table, key as Postgres renders it).
    rows: HashMap<(String, String), CachedRow>,
    /// (table, key as a device pushed it) → key as Postgres renders it; a device sends its keys
    /// the same way every time, while Postgres may write them differently (a UUID's case).
    aliases: HashMap<(String, String), String>,
}

impl RowCache {
    pub fn new(limit: usize, budget: RowBudget) -> RowCache {
        RowCache { limit, budget, head: None, rows: HashMap::new(), aliases: HashMap::new() }
    }

    /// A cache that holds nothing.
    pub fn off() -> RowCache {
        RowCache::new(0, RowBudget::new(0))
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn clear(&mut self) {
        self.head = None;
        self.drop_rows();
    }

    fn drop_rows(&mut self) {
        self.budget.release(self.rows.len());
        self.rows.clear();
        self.aliases.clear();
    }

    /// Whether the rows may be used by a group that expects the tenant's head at `head`;
    /// when not, they are dropped.
    pub(super) fn usable_at(&mut self, head: Option<Seq>) -> bool {
        if self.limit > 0 && head.is_some() && self.head == head {
            return true;
        }
        self.clear();
        false
    }

    /// Take out the row a device addresses with `pushed_key` (its key object as JSON text), if
    /// held and merged under this `table` description. Returns the key as Postgres renders it
    /// (as JSON text) and the row.
    pub(super) fn take(&mut self, table: &Arc<TableSchema>, pushed_key: &str) -> Option<(String, CachedRow)> {
        let normalized = self.aliases.get(&(table.name.clone(), pushed_key.to_owned()))?.clone();
        let row = self.rows.remove(&(table.name.clone(), normalized.clone()))?;
        self.budget.release(1);
        if !Arc::ptr_eq(&row.table, table) {
            return None;
        }
        Some((normalized, row))
    }

    /// After a commit that left the tenant's head at `head`: hold `rows` (keyed by table and
    /// key as Postgres renders it), current as of then, and the keys devices used for them.
    /// Rows held before stay, being current too (the head moved only by this commit). When
    /// the cache would pass its limit, it starts over with this commit's rows alone; when all
    /// tenants' caches together hold the budget, it holds what is left of it.
    pub(super) fn put(
        &mut self,
        head: Seq,
        rows: impl ExactSizeIterator<Item = ((String, String), CachedRow)>,
        aliases: impl Iterator<Item = ((String, String), String)>,
    ) {
        if self.limit == 0 {
            return;
        }
        if self.rows.len() + rows.len() > self.limit || self.aliases.len() + rows.len() > 2 * self.limit {
            self.drop_rows();
        }
        self.head = Some(head);
        let wanted = rows.len().min(self.limit);
        let mut granted = self.budget.reserve(wanted);
        if granted < wanted && !self.rows.is_empty() {
            // The budget is spent: this tenant's newest rows are worth more to it than its older.
            self.drop_rows();
            granted += self.budget.reserve(wanted - granted);
        }
        let before = self.rows.len();
        for (id, row) in rows.take(granted) {
            self.rows.insert(id, row);
        }
        // A row held under another key as pushed was replaced, not added.
        self.budget.release(granted - (self.rows.len() - before));
        for (pushed, normalized) in aliases {
            if self.aliases.len() >= 2 * self.limit {
                break;
            }
            self.aliases.insert(pushed, normalized);
        }
    }
}

impl Drop for RowCache {
    fn drop(&mut self) {
        self.budget.release(self.rows.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MergePolicy;
    use serde_json::json;

    fn products() -> Arc<TableSchema> {
        Arc::new(TableSchema {
            name: "products".into(),
            tenant_column: "tenant_id".into(),
            tenant_type: "text".into(),
            key: vec!["id".into()],
            columns: Default::default(),
            policy: MergePolicy::Lww,
            row_json: "to_json",
            read_sql: String::new(),
            read_locking_cursors_sql: String::new(),
            delete_sql: String::new(),
        })
    }

    fn row(table: &Arc<TableSchema>, id: &str, version: u64) -> ((String, String), CachedRow) {
        let key = json!({"id": id}).as_object().cloned().unwrap();
        let state = RowState { values: Some(key.clone()), version, ..RowState::default() };
        ((table.name.clone(), serde_json::Value::Object(key.clone()).to_string()), CachedRow { table: table.clone(), key, state })
    }

    fn alias(table: &Arc<TableSchema>, pushed: &str, id: &str) -> ((String, String), String) {
        ((table.name.clone(), pushed.to_owned()), json!({"id": id}).to_string())
    }

    #[test]
    fn rows_are_found_by_the_key_as_pushed_and_taken_out() {
        let table = products();
        let mut cache = RowCache::new(10, RowBudget::new(100));
        cache.put(7, [row(&table, "a", 7)].into_iter(), [alias(&table, r#"{"id":"A"}"#, "a")].into_iter());
        assert!(cache.usable_at(Some(7)));
        assert!(cache.take(&table, r#"{"id":"a"}"#).is_none(), "a key never pushed that way is not known");
        let (normalized, taken) = cache.take(&table, r#"{"id":"A"}"#).expect("held");
        assert_eq!((normalized.as_str(), taken.state.version), (r#"{"id":"a"}"#, 7));
        assert!(cache.take(&table, r#"{"id":"A"}"#).is_none(), "taken out: the group owns it now");
    }

    #[test]
    fn another_head_or_a_reloaded_table_empties_or_misses() {
        let table = products();
        let mut cache = RowCache::new(10, RowBudget::new(100));
        cache.put(7, [row(&table, "a", 7)].into_iter(), [alias(&table, r#"{"id":"a"}"#, "a")].into_iter());
        assert!(!cache.usable_at(Some(8)), "another writer moved the head");
        assert!(cache.is_empty());
        assert!(!cache.usable_at(None), "a group that does not know the head");

        cache.put(8, [row(&table, "a", 8)].into_iter(), [alias(&table, r#"{"id":"a"}"#, "a")].into_iter());
        assert!(cache.usable_at(Some(8)));
        assert!(cache.take(&products(), r#"{"id":"a"}"#).is_none(), "merged under another description of the table");
    }

    #[test]
    fn it_holds_at_most_its_limit_and_nothing_when_off() {
        let table = products();
        let mut cache = RowCache::new(2, RowBudget::new(100));
        let aliases = |ids: &[&str]| ids.iter().map(|id| alias(&table, &json!({"id": id}).to_string(), id)).collect::<Vec<_>>();
        cache.put(1, [row(&table, "a", 1), row(&table, "b", 1)].into_iter(), aliases(&["a", "b"]).into_iter());
        assert_eq!(cache.len(), 2);
        // Rows held stay current when only this cache's group moved the head; past the limit
        // the cache starts over with the newest group's rows.
        cache.put(2, [row(&table, "c", 2)].into_iter(), aliases(&["c"]).into_iter());
        assert_eq!(cache.len(), 1);
        assert!(cache.usable_at(Some(2)));
        assert!(cache.take(&table, r#"{"id":"c"}"#).is_some());
        assert!(cache.take(&table, r#"{"id":"a"}"#).is_none());

        let mut off = RowCache::off();
        off.put(1, [row(&table, "a", 1)].into_iter(), aliases(&["a"]).into_iter());
        assert!(off.is_empty());
        assert!(!off.usable_at(Some(1)));
    }

    #[test]
    fn all_tenants_together_hold_at_most_the_budget() {
        let table = products();
        let budget = RowBudget::new(3);
        let aliases = |ids: &[&str]| ids.iter().map(|id| alias(&table, &json!({"id": id}).to_string(), id)).collect::<Vec<_>>();
        let mut first = RowCache::new(10, budget.clone());
        let mut second = RowCache::new(10, budget.clone());
        first.put(1, [row(&table, "a", 1), row(&table, "b", 1)].into_iter(), aliases(&["a", "b"]).into_iter());
        second.put(1, [row(&table, "c", 1), row(&table, "d", 1)].into_iter(), aliases(&["c", "d"]).into_iter());
        assert_eq!((first.len(), second.len(), budget.held()), (2, 1, 3), "the second gets what is left");

        // A row taken out is counted again when the group puts it back.
        assert!(first.usable_at(Some(1)));
        let (_, a) = first.take(&table, r#"{"id":"a"}"#).unwrap();
        assert_eq!(budget.held(), 2);
        first.put(2, [((table.name.clone(), r#"{"id":"a"}"#.to_owned()), a)].into_iter(), std::iter::empty());
        assert_eq!((first.len(), budget.held()), (2, 3));

        // With the budget spent, a tenant gives up its older rows for its newest.
        second.put(2, [row(&table, "e", 2), row(&table, "f", 2)].into_iter(), aliases(&["e", "f"]).into_iter());
        assert_eq!((first.len(), second.len(), budget.held()), (2, 1, 3));
        first.clear();
        assert_eq!(budget.held(), 1);
        drop(second);
        assert_eq!(budget.held(), 0, "a stopped tenant's rows are given back");
    }
}
